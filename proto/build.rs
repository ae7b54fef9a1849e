//! Compiles `proto/qun.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/qun.proto");
    let descriptors = protox::compile(["qun.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        // Most messages are text: keep ChatMessage small, the commerce
        // event behind a pointer.
        .boxed(".qun.v1.ChatMessage.commerce")
        .boxed(".qun.v1.ServerFrame.body.commerce")
        .compile_fds(descriptors)?;
    Ok(())
}
