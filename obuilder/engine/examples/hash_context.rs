//! Times the `copy` manifest of a directory (walk + parallel SHA-256), for
//! `bench/hash_bench.py`. Usage: hash_context DIR  → prints "BYTES SECONDS".

fn main() {
    let dir = std::env::args().nth(1).expect("usage: hash_context DIR");
    let dir = std::path::Path::new(&dir);
    let t = std::time::Instant::now();
    let m = obuilder_engine::copy::manifest(dir, ".", &[]).expect("manifest");
    let secs = t.elapsed().as_secs_f64();
    let bytes: u64 = walkdir(dir);
    std::hint::black_box(m);
    println!("{bytes} {secs}");
}

fn walkdir(d: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            n += walkdir(&e.path());
        } else if m.is_file() {
            n += m.len();
        }
    }
    n
}
