//! Generates the Rust code of the schema with `capnpc`, which runs Debian's `capnp`
//! compiler (package `capnproto`, installed by `scripts/setup.sh`).

fn main() {
    println!("cargo:rerun-if-changed=schema");
    if let Err(e) = capnpc::CompilerCommand::new()
        .src_prefix("schema")
        .file("schema/schema.capnp")
        .file("schema/persistent.capnp")
        .run()
    {
        eprintln!(
            "error: cannot compile the Cap'n Proto schema: {e}\n\
             The `capnp` compiler comes from Debian's `capnproto` package: run `bash scripts/setup.sh` \
             (or `apt-get install capnproto`)."
        );
        std::process::exit(1);
    }
}
