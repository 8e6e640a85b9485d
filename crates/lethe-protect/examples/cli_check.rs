//! Temporary compile check of crates/lethe-cli/src/protect.rs.
#[path = "../../lethe-cli/src/protect.rs"]
#[allow(dead_code)]
mod protect;
fn main() {}
