import Foundation
import Yams

/// Where the API server is and how to authenticate to it.
public struct ClusterConfig: Sendable {
    /// How requests authenticate.
    public enum Credentials: Sendable, Equatable {
        case none
        case token(String)
        /// A token file, re-read for every new connection (service-account tokens rotate).
        case tokenFile(String)
    }

    /// `https` or `http`.
    public var scheme: String
    public var host: String
    public var port: Int
    /// Trust roots for the API server (PEM bytes and/or a file path); both nil: system roots.
    public var certificateAuthorityPEM: [UInt8]?
    public var certificateAuthorityFile: String?
    public var clientCertificatePEM: [UInt8]?
    public var clientKeyPEM: [UInt8]?
    public var insecureSkipTLSVerify: Bool
    /// Name to verify the server certificate against (kubeconfig `tls-server-name`); default: `host`.
    public var tlsServerName: String?
    public var credentials: Credentials
    /// The namespace of the context / service account, when known.
    public var namespace: String?

    public init(scheme: String = "https", host: String, port: Int, certificateAuthorityPEM: [UInt8]? = nil,
                certificateAuthorityFile: String? = nil, clientCertificatePEM: [UInt8]? = nil,
                clientKeyPEM: [UInt8]? = nil, insecureSkipTLSVerify: Bool = false, tlsServerName: String? = nil,
                credentials: Credentials = .none, namespace: String? = nil) {
        self.scheme = scheme
        self.host = host
        self.port = port
        self.certificateAuthorityPEM = certificateAuthorityPEM
        self.certificateAuthorityFile = certificateAuthorityFile
        self.clientCertificatePEM = clientCertificatePEM
        self.clientKeyPEM = clientKeyPEM
        self.insecureSkipTLSVerify = insecureSkipTLSVerify
        self.tlsServerName = tlsServerName
        self.credentials = credentials
        self.namespace = namespace
    }

    public var usesTLS: Bool { scheme == "https" }

    /// `scheme://host:port` (IPv6 bracketed).
    public var serverURL: String {
        let h = host.contains(":") ? "[\(host)]" : host
        return "\(scheme)://\(h):\(port)"
    }

    /// Parses `https://host[:port]` / `http://host[:port]` (a path is ignored).
    public static func parseServer(_ server: String) throws -> (scheme: String, host: String, port: Int) {
        guard let comps = URLComponents(string: server), let scheme = comps.scheme?.lowercased(),
              scheme == "https" || scheme == "http", var host = comps.host, !host.isEmpty
        else { throw KubernetesError.configuration("invalid server URL \(server.debugDescription)") }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (scheme, host, comps.port ?? (scheme == "https" ? 443 : 80))
    }

    // MARK: In-cluster

    public static let serviceAccountDirectory = "/var/run/secrets/kubernetes.io/serviceaccount"

    /// In-cluster configuration: `KUBERNETES_SERVICE_HOST`/`_PORT`, the service-account token (re-read on
    /// every connection), `ca.crt` and `namespace`.
    public static func inCluster(environment: [String: String] = ProcessInfo.processInfo.environment,
                                 serviceAccountDirectory dir: String = serviceAccountDirectory) throws -> ClusterConfig {
        guard let host = environment["KUBERNETES_SERVICE_HOST"], !host.isEmpty else {
            throw KubernetesError.configuration("not running in a cluster (KUBERNETES_SERVICE_HOST is unset)")
        }
        let portText = environment["KUBERNETES_SERVICE_PORT"] ?? "443"
        guard let port = Int(portText), (1...65535).contains(port) else {
            throw KubernetesError.configuration("invalid KUBERNETES_SERVICE_PORT \(portText)")
        }
        let tokenPath = dir + "/token"
        guard FileManager.default.isReadableFile(atPath: tokenPath) else {
            throw KubernetesError.configuration("service-account token \(tokenPath) is not readable")
        }
        let caPath = dir + "/ca.crt"
        let namespace = (try? String(contentsOfFile: dir + "/namespace", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        return ClusterConfig(scheme: "https", host: host, port: port,
                             certificateAuthorityFile: FileManager.default.fileExists(atPath: caPath) ? caPath : nil,
                             credentials: .tokenFile(tokenPath),
                             namespace: (namespace?.isEmpty ?? true) ? nil : namespace)
    }

    // MARK: kubeconfig

    /// Loads a kubeconfig file: the `context` (default: `current-context`) → cluster + user.
    /// Relative file paths are resolved against the kubeconfig's directory.
    public static func kubeconfig(path: String, context: String? = nil) throws -> ClusterConfig {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw KubernetesError.configuration("cannot read kubeconfig \(path): \(error)")
        }
        return try kubeconfig(yaml: text, baseDirectory: (path as NSString).deletingLastPathComponent, context: context)
    }

    /// Parses kubeconfig YAML text.
    public static func kubeconfig(yaml text: String, baseDirectory: String = ".", context contextName: String? = nil) throws -> ClusterConfig {
        let file: KubeconfigFile
        do {
            file = try YAMLDecoder().decode(KubeconfigFile.self, from: text)
        } catch {
            throw KubernetesError.configuration("invalid kubeconfig: \(describeDecodingError(error))")
        }
        guard let name = contextName ?? file.currentContext, !name.isEmpty else {
            throw KubernetesError.configuration("kubeconfig has no current-context")
        }
        guard let context = file.contexts?.first(where: { $0.name == name })?.context else {
            throw KubernetesError.configuration("kubeconfig context \(name.debugDescription) not found")
        }
        guard let clusterName = context.cluster,
              let cluster = file.clusters?.first(where: { $0.name == clusterName })?.cluster else {
            throw KubernetesError.configuration("kubeconfig cluster \(context.cluster ?? "<none>") not found")
        }
        guard let serverText = cluster.server else {
            throw KubernetesError.configuration("kubeconfig cluster \(clusterName) has no server")
        }
        let server = try parseServer(serverText)
        let user = context.user.flatMap { u in file.users?.first(where: { $0.name == u })?.user }

        func resolve(_ p: String) -> String {
            p.hasPrefix("/") ? p : (baseDirectory as NSString).appendingPathComponent(p)
        }
        func readFile(_ p: String, _ what: String) throws -> [UInt8] {
            guard let data = FileManager.default.contents(atPath: resolve(p)) else {
                throw KubernetesError.configuration("cannot read \(what) \(resolve(p))")
            }
            return [UInt8](data)
        }
        func base64(_ s: String, _ what: String) throws -> [UInt8] {
            let cleaned = s.filter { !$0.isWhitespace }
            guard let data = Data(base64Encoded: cleaned) else {
                throw KubernetesError.configuration("\(what) is not valid base64")
            }
            return [UInt8](data)
        }

        var config = ClusterConfig(scheme: server.scheme, host: server.host, port: server.port)
        config.insecureSkipTLSVerify = cluster.insecureSkipTLSVerify ?? false
        config.tlsServerName = cluster.tlsServerName
        if let data = cluster.certificateAuthorityData {
            config.certificateAuthorityPEM = try base64(data, "certificate-authority-data")
        } else if let file = cluster.certificateAuthority {
            config.certificateAuthorityPEM = try readFile(file, "certificate-authority")
        }
        if let user {
            if let data = user.clientCertificateData {
                config.clientCertificatePEM = try base64(data, "client-certificate-data")
            } else if let file = user.clientCertificate {
                config.clientCertificatePEM = try readFile(file, "client-certificate")
            }
            if let data = user.clientKeyData {
                config.clientKeyPEM = try base64(data, "client-key-data")
            } else if let file = user.clientKey {
                config.clientKeyPEM = try readFile(file, "client-key")
            }
            if (config.clientCertificatePEM == nil) != (config.clientKeyPEM == nil) {
                throw KubernetesError.configuration("kubeconfig user needs both a client certificate and a client key")
            }
            if let token = user.token, !token.isEmpty {
                config.credentials = .token(token)
            } else if let tokenFile = user.tokenFile, !tokenFile.isEmpty {
                config.credentials = .tokenFile(resolve(tokenFile))
            } else if user.exec != nil || user.authProvider != nil {
                throw KubernetesError.configuration("kubeconfig user uses exec/auth-provider credentials, which are not supported; use a token or client certificate")
            }
        }
        config.namespace = context.namespace
        return config
    }

    /// Resolution order of controller-runtime: `--kubeconfig`, `$KUBECONFIG` (first existing entry),
    /// in-cluster, `~/.kube/config`.
    public static func load(kubeconfigPath: String? = nil,
                            environment: [String: String] = ProcessInfo.processInfo.environment,
                            serviceAccountDirectory: String = serviceAccountDirectory) throws -> ClusterConfig {
        if let path = kubeconfigPath, !path.isEmpty {
            return try kubeconfig(path: path)
        }
        if let list = environment["KUBECONFIG"], !list.isEmpty {
            let paths = list.split(separator: ":").map(String.init)
            if let first = paths.first(where: { FileManager.default.fileExists(atPath: $0) }) {
                return try kubeconfig(path: first)
            }
            throw KubernetesError.configuration("no file of KUBECONFIG=\(list) exists")
        }
        if let host = environment["KUBERNETES_SERVICE_HOST"], !host.isEmpty {
            return try inCluster(environment: environment, serviceAccountDirectory: serviceAccountDirectory)
        }
        let home = environment["HOME"] ?? NSHomeDirectory()
        let path = home + "/.kube/config"
        if FileManager.default.fileExists(atPath: path) {
            return try kubeconfig(path: path)
        }
        throw KubernetesError.configuration("no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, run in a cluster, or create ~/.kube/config")
    }
}

// MARK: kubeconfig file model

struct KubeconfigFile: Decodable {
    struct NamedCluster: Decodable { var name: String; var cluster: Cluster? }
    struct Cluster: Decodable {
        var server: String?
        var certificateAuthority: String?
        var certificateAuthorityData: String?
        var insecureSkipTLSVerify: Bool?
        var tlsServerName: String?
        enum CodingKeys: String, CodingKey {
            case server
            case certificateAuthority = "certificate-authority"
            case certificateAuthorityData = "certificate-authority-data"
            case insecureSkipTLSVerify = "insecure-skip-tls-verify"
            case tlsServerName = "tls-server-name"
        }
    }
    struct NamedUser: Decodable { var name: String; var user: User? }
    struct User: Decodable {
        var token: String?
        var tokenFile: String?
        var clientCertificate: String?
        var clientCertificateData: String?
        var clientKey: String?
        var clientKeyData: String?
        var exec: Ignored?
        var authProvider: Ignored?
        enum CodingKeys: String, CodingKey {
            case token, tokenFile, exec
            case authProvider = "auth-provider"
            case clientCertificate = "client-certificate"
            case clientCertificateData = "client-certificate-data"
            case clientKey = "client-key"
            case clientKeyData = "client-key-data"
        }
    }
    struct Ignored: Decodable { init(from decoder: any Decoder) throws {} }
    struct NamedContext: Decodable { var name: String; var context: Context? }
    struct Context: Decodable { var cluster: String?; var user: String?; var namespace: String? }

    var clusters: [NamedCluster]?
    var users: [NamedUser]?
    var contexts: [NamedContext]?
    var currentContext: String?
    enum CodingKeys: String, CodingKey {
        case clusters, users, contexts
        case currentContext = "current-context"
    }
}
