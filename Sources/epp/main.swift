print("epp")
