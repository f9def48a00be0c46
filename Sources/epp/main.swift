import EPP

do {
    var command = try EPPCommand.parseAsRoot(EPPCommand.normalize(Array(CommandLine.arguments.dropFirst())))
    if var asyncCommand = command as? any AsyncParsableCommandRunnable {
        try await asyncCommand.runAsync()
    } else {
        try command.run()
    }
} catch {
    EPPCommand.exit(withError: error)
}
