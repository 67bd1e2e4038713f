//! Compiles `fleetban/v1/*.proto` with protox (a pure-Rust protobuf compiler),
//! so building fleetban never needs a system `protoc`.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &["fleetban/v1/agent.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, [&root])?;
    // protox and tonic-prost-build may link different prost-types builds;
    // the encoded descriptor set is the stable interface between them.
    let bytes = descriptors.encode_to_vec();
    // Kept for reflection-style tests (every message is round-tripped).
    std::fs::write(out_dir.join("fleetban_descriptor.bin"), &bytes)?;
    let fds = tonic_prost_build::FileDescriptorSet::decode(bytes.as_slice())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The `Connect` RPC would collide with the generated
        // `AgentServiceClient::connect(endpoint)` constructor; clients build a
        // `Channel` themselves and use `AgentServiceClient::new(channel)`.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
