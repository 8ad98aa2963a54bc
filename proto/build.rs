//! Compiles the .proto files with protox (pure Rust), so no machine needs
//! `protoc` installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "charon/v1/hosts.proto",
        "charon/v1/certs.proto",
        "charon/v1/cluster.proto",
        "charon/v1/tokens.proto",
        "charon/v1/nodes.proto",
        "charon/v1/observe.proto",
        "charon/cluster/v1/sync.proto",
        "charon/store/v1/record.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
