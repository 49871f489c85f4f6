//! Compiles `rustci-runners-valkyrie/proto/valkyrie/v1/valkyrie.proto` with protox (a
//! .proto compiler in Rust) and writes the prost messages and tonic client and server
//! into `rustci-runners-valkyrie/src/gen/`. Run from anywhere: `scripts/gen-valkyrie`.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../rustci-runners-valkyrie");
    let proto_dir = root.join("proto");
    let file = proto_dir.join("valkyrie/v1/valkyrie.proto");
    let out = root.join("src/gen");
    let fds = protox::compile([&file], [&proto_dir]).unwrap_or_else(|e| {
        eprintln!("compiling {}: {e}", file.display());
        std::process::exit(1)
    });
    std::fs::create_dir_all(&out).expect("creating the output directory");
    tonic_prost_build::configure()
        .out_dir(&out)
        .build_client(true)
        .build_server(true)
        // Small per-call buffers: thousands of sessions each hold two calls open.
        .codec_path("crate::codec::SmallCodec")
        .compile_fds(fds)
        .unwrap_or_else(|e| {
            eprintln!("generating code: {e}");
            std::process::exit(1)
        });
    println!("wrote {}", out.join("valkyrie.v1.rs").display());
}
