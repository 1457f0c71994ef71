//! Generates the tonic/prost code for `tunnel.v1` with a vendored `protoc`, so no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; build scripts are single-threaded, so setting it here is sound.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/tunnel.proto");
    let mut config = tonic_prost_build::Config::new();
    // These messages carry secrets: their Debug impls are written by hand in lib.rs and redact them.
    config.skip_debug([
        "tunnel.v1.Hello",
        "tunnel.v1.Welcome",
        "tunnel.v1.JoinTokenReply",
        "tunnel.v1.NewToken",
    ]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The generated `connect` constructor would clash with the `Control.Connect` RPC; channels are
        // built by tunnel-node with the pinned-TLS connector anyway.
        .build_transport(false)
        .compile_with_config(config, &["proto/tunnel.proto"], &["proto"])?;
    Ok(())
}
