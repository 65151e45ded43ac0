use std::time::Instant;
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let mut cache = agentseg::policy::PolicyCache::default();
    for _ in 0..4 {
        let t = Instant::now();
        let set = cache.load_dir(&dir).unwrap();
        let t_load = t.elapsed();
        let t = Instant::now();
        let w = agentseg::policy::warnings(&set);
        let t_warn = t.elapsed();
        let t = Instant::now();
        let c = agentseg::compile::compile(&set).unwrap();
        let t_comp = t.elapsed();
        let t = Instant::now();
        let eq = c == c.clone();
        let t_eq = t.elapsed();
        println!(
            "cached load {:?} warnings {:?} compile {:?} clone+eq {:?} {} {} {}",
            t_load,
            t_warn,
            t_comp,
            t_eq,
            c.entry_count(),
            eq,
            w.len()
        );
    }
}
