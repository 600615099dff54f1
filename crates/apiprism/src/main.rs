//! The `apiprism` binary: everything is in the library and the shared runtime.
fn main() -> std::process::ExitCode {
    hybridnet_runtime::main::<hybridnet_apiprism::Apiprism>()
}
