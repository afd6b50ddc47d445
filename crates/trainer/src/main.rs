fn main() { eprintln!("afinar: not yet"); std::process::exit(2) }
