fn main() { eps_server::main() }
