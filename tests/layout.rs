//! The daemon's source layout (issue 10): no module of `daemon/src` imports
//! another in a loop, and every source file docs/architecture.md names exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, relative to `base`.
fn rust_files(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(base, &p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p.strip_prefix(base).expect("under base").to_path_buf());
        }
    }
}

/// `conn/table.rs` -> `conn::table`, `shard/mod.rs` -> `shard`.
fn module_of(file: &Path) -> String {
    let s = file.to_string_lossy().trim_end_matches(".rs").to_string();
    s.trim_end_matches("/mod").replace('/', "::")
}

/// The library's modules (binaries and the crate root left out) and the
/// modules each one names through `crate::` outside comments and its
/// `#[cfg(test)] mod tests`.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("daemon/src");
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files
        .into_iter()
        .filter(|f| !f.starts_with("bin") && f != Path::new("lib.rs") && f != Path::new("main.rs"))
        .map(|f| (module_of(&f), f))
        .collect();
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(src.join(file)).expect("read source");
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        let mut uses = BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let path: Vec<&str> = rest
                    .split(|c: char| !(c.is_ascii_lowercase() || c == '_' || c == ':'))
                    .next()
                    .unwrap_or_default()
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .collect();
                // The longest prefix that is a module.
                if let Some(target) = (1..=path.len())
                    .rev()
                    .map(|n| path[..n].join("::"))
                    .find(|c| modules.contains_key(c))
                {
                    let own_child = module.starts_with(&format!("{target}::"));
                    if &target != module && !own_child {
                        uses.insert(target);
                    }
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// A cycle through `graph`, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_another_in_a_loop() {
    let graph = import_graph();
    assert!(graph.len() > 40, "found only {} modules", graph.len());
    assert!(
        graph["shard"].contains("conn::table"),
        "the scan sees imports"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import loop: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_scan_finds_a_loop_when_there_is_one() {
    let mut graph = import_graph();
    graph
        .get_mut("presence::owner")
        .expect("presence::owner")
        .insert("shard".to_owned());
    assert!(find_cycle(&graph).is_some());
}

#[test]
fn rooms_keep_their_layering() {
    let graph = import_graph();
    let room = |m: &str| m.split("::").next().unwrap_or_default().to_owned();
    let forbidden: &[(&str, &[&str])] = &[
        (
            "presence",
            &["store", "shard", "control", "process", "conn"],
        ),
        ("store", &["shard", "control", "process", "conn"]),
        ("conn", &["shard", "control", "process"]),
        ("shard", &["control", "process"]),
        ("control", &["process"]),
    ];
    for (module, uses) in &graph {
        for (from, banned) in forbidden {
            if room(module) == *from {
                // The deadline wheel and the epoll set are generic utilities
                // below presence (docs/architecture.md, section 0).
                for u in uses
                    .iter()
                    .filter(|u| !matches!(u.as_str(), "conn::wheel" | "conn::poller"))
                {
                    assert!(
                        !banned.contains(&room(u).as_str()),
                        "{module} imports {u}: {from}/ must not import {}",
                        room(u)
                    );
                }
            }
        }
    }
}

#[test]
fn every_file_architecture_md_names_exists() {
    let doc =
        std::fs::read_to_string(root().join("docs/architecture.md")).expect("architecture.md");
    let mut named = BTreeSet::new();
    for (i, _) in doc.match_indices('`') {
        let rest = &doc[i + 1..];
        let word: String = rest
            .chars()
            .take_while(|c| {
                c.is_ascii_lowercase() || *c == '_' || *c == '/' || *c == '.' || c.is_ascii_digit()
            })
            .collect();
        if word.ends_with(".rs") {
            named.insert(word);
        }
    }
    assert!(named.len() > 20, "found only {} file names", named.len());
    let missing: Vec<&String> = named
        .iter()
        .filter(|f| !root().join("daemon/src").join(f).exists() && !root().join(f).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md names files that do not exist: {missing:?}"
    );
}
