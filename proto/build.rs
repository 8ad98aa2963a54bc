//! Compiles the .proto files with protox (pure Rust), so no machine needs
//! `protoc` installed.
//!
//! The public API's messages (`charon.v1`) derive `serde::Serialize`, so
//! `charonctl -o json` prints the proto types themselves: every field under
//! its proto name, and a field added to the API appears in the JSON without
//! anyone writing it twice (sozu's `print_json_response<T: Serialize>`).
//! Internal packages (replication, the store's records) derive nothing.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "charon/v1/hosts.proto",
        "charon/v1/balance.proto",
        "charon/v1/certs.proto",
        "charon/v1/cluster.proto",
        "charon/v1/tokens.proto",
        "charon/v1/nodes.proto",
        "charon/v1/observe.proto",
        "charon/v1/access.proto",
        "charon/cluster/v1/sync.proto",
        "charon/store/v1/record.proto",
        "charon/store/v1/balance.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .type_attribute(".charon.v1", "#[derive(serde::Serialize)]")
        // prost names the field `self_` (a Rust keyword); JSON keeps `self`.
        .field_attribute(".charon.v1.Member.self", "#[serde(rename = \"self\")]")
        // Sorted origins: the same JSON for the same state, diffable.
        .btree_map(".charon.v1.Member.applied")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
