//! No import cycles between modules of `node/` and `ctl/`.
//!
//! A cycle between two modules means neither can be read, tested or moved
//! without the other: a newcomer following one behaviour ends up reading
//! both. The rule is checked for every directory of a crate: the modules
//! under one directory (the top-level modules under `src/`, the submodules
//! of `src/proxy/`, of `src/store/`...) must form a graph without cycles.
//!
//! The graph is built from the source text: every `crate::a::b` and
//! `super::c` path (in `use` trees, grouped or not, and inline in code) is
//! resolved to the module it names; a path from a module under directory
//! `D` to another module under `D` is an edge between the two children of
//! `D` that contain them. A parent's own `mod.rs` and its children are not
//! siblings, so a parent re-exporting its children is no cycle. Code under
//! `#[cfg(test)]` is left out: tests may reach across to build fixtures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles allowed to remain, as (level, members): none. A cycle found at
/// `level` would pass only if its modules were a subset of one entry.
const ALLOWED: &[(&str, &[&str])] = &[];

#[test]
fn node_modules_have_no_import_cycles() {
    assert_no_cycles("node");
}

#[test]
fn ctl_modules_have_no_import_cycles() {
    assert_no_cycles("ctl");
}

fn assert_no_cycles(krate: &str) {
    let src = charon_tests::repo_root().join(krate).join("src");
    let graph = Graph::scan(&src);
    assert!(
        graph.modules.len() > 3,
        "scanned too few modules under {}",
        src.display()
    );
    let mut report = String::new();
    for cycle in graph.cycles() {
        let allowed = ALLOWED.iter().any(|(level, members)| {
            *level == format!("{krate}/src/{}", cycle.level)
                && cycle.members.iter().all(|m| members.contains(&m.as_str()))
        });
        if !allowed {
            report.push_str(&cycle.describe(krate));
        }
    }
    assert!(
        report.is_empty(),
        "import cycles between modules:\n{report}"
    );
}

/// Modules found in a crate's `src/` and the sibling edges between them.
struct Graph {
    modules: BTreeSet<Vec<String>>,
    /// Level (the parent's path) → edges between its children, each with
    /// the first place (`file:line`) that makes it.
    edges: BTreeMap<Vec<String>, BTreeMap<(String, String), String>>,
}

/// One strongly connected set of sibling modules.
struct Cycle {
    level: String,
    members: Vec<String>,
    /// Edges inside the set, with where they come from.
    edges: Vec<(String, String, String)>,
}

impl Cycle {
    fn describe(&self, krate: &str) -> String {
        let mut s = format!(
            "  under {krate}/src/{}: {{{}}}\n",
            self.level,
            self.members.join(", ")
        );
        for (from, to, at) in &self.edges {
            s.push_str(&format!("    {from} -> {to}   ({at})\n"));
        }
        s
    }
}

/// A reference found in a file: the module it is written in and the path.
struct Reference {
    from: Vec<String>,
    path: Vec<String>,
    line: usize,
}

/// What scanning one file yields.
#[derive(Default)]
struct Scan {
    references: Vec<Reference>,
    /// Inline `mod x { ... }` modules (full paths), outside `#[cfg(test)]`.
    inline: Vec<Vec<String>>,
    /// `#[cfg(test)] mod x;` declarations (full paths): test-only files.
    test_only: Vec<Vec<String>>,
}

impl Graph {
    fn scan(src: &Path) -> Graph {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let mut modules = BTreeSet::new();
        let mut scans = Vec::new();
        for file in &files {
            let module = module_of(src, file);
            let text = std::fs::read_to_string(file).expect("read a source file");
            let shown = file.strip_prefix(src).unwrap_or(file).display().to_string();
            modules.insert(module.clone());
            scans.push((shown, scan_file(&text, &module)));
        }
        let test_only: Vec<Vec<String>> = scans
            .iter()
            .flat_map(|(_, s)| s.test_only.iter().cloned())
            .collect();
        for (_, s) in &scans {
            modules.extend(s.inline.iter().cloned());
        }
        let in_tests = |m: &[String]| test_only.iter().any(|t| m.starts_with(t));
        modules.retain(|m| !in_tests(m));
        let mut edges: BTreeMap<Vec<String>, BTreeMap<(String, String), String>> = BTreeMap::new();
        for (file, scan) in &scans {
            for r in &scan.references {
                if in_tests(&r.from) {
                    continue;
                }
                let Some(target) = resolve(&modules, &r.path) else {
                    continue;
                };
                let common = r
                    .from
                    .iter()
                    .zip(&target)
                    .take_while(|(a, b)| a == b)
                    .count();
                if common < r.from.len() && common < target.len() {
                    edges
                        .entry(r.from[..common].to_vec())
                        .or_default()
                        .entry((r.from[common].clone(), target[common].clone()))
                        .or_insert_with(|| format!("{file}:{}", r.line));
                }
            }
        }
        Graph { modules, edges }
    }

    /// Every set of two or more siblings that reach each other.
    fn cycles(&self) -> Vec<Cycle> {
        let mut out = Vec::new();
        for (level, edges) in &self.edges {
            for members in strongly_connected(edges) {
                let inside = edges
                    .iter()
                    .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                    .map(|((a, b), at)| (a.clone(), b.clone(), at.clone()))
                    .collect();
                out.push(Cycle {
                    level: level.join("/"),
                    members,
                    edges: inside,
                });
            }
        }
        out
    }
}

/// Tarjan's algorithm; returns only the components with two or more nodes
/// (an edge never joins a module to itself).
fn strongly_connected(edges: &BTreeMap<(String, String), String>) -> Vec<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        next.entry(a).or_default().push(b);
        next.entry(b).or_default();
    }
    struct State<'a> {
        next: &'a BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in &s.next[v] {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        next: &next,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for &v in next.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read a source directory")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `lib.rs`/`main.rs` → the root, `a/mod.rs` and `a.rs` → `a`, `a/b.rs` → `a::b`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("a file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    let at_root = parts.is_empty() && (stem == "lib" || stem == "main");
    if stem != "mod" && !at_root {
        parts.push(stem.to_string());
    }
    parts
}

/// The longest prefix of `path` that is a module (`self` segments dropped).
fn resolve(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Option<Vec<String>> {
    let path: Vec<String> = path.iter().filter(|s| *s != "self").cloned().collect();
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
    /// `::`
    Path,
}

/// Identifiers and punctuation with their line, comments, strings and
/// character literals removed (a `crate::` inside a doc comment is prose).
fn tokens(text: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            loop {
                if at(i) == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else if i >= chars.len() {
                    break;
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if c == 'r' && (at(i + 1) == '#' || at(i + 1) == '"') && raw_string_at(&chars, i) {
            let mut hashes = 0;
            i += 1;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1; // the opening quote
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                line += usize::from(chars[i] == '\n');
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                line += usize::from(at(i) == '\n');
                i += 1;
            }
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), line));
        } else if c == ':' && at(i + 1) == ':' {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// `r"..."` or `r#"..."#` starts at `i` (and not an identifier ending in r).
fn raw_string_at(chars: &[char], i: usize) -> bool {
    let before = i.checked_sub(1).map(|p| chars[p]).unwrap_or(' ');
    if before.is_alphanumeric() || before == '_' {
        return false;
    }
    let mut j = i + 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"')
}

fn is_ident(t: Option<&(Tok, usize)>, name: &str) -> bool {
    matches!(t, Some((Tok::Ident(s), _)) if s == name)
}

fn is_punct(t: Option<&(Tok, usize)>, c: char) -> bool {
    matches!(t, Some((Tok::Punct(p), _)) if *p == c)
}

fn is_path(t: Option<&(Tok, usize)>) -> bool {
    matches!(t, Some((Tok::Path, _)))
}

fn scan_file(text: &str, module: &[String]) -> Scan {
    let toks = tokens(text);
    let mut scan = Scan::default();
    // Inline modules open at a brace depth: (name, depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let current = |inline: &[(String, usize)]| {
        let mut m = module.to_vec();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    if is_punct(toks.first(), '#') && is_punct(toks.get(1), '!') && cfg_test_at(&toks, 2) {
        return scan; // `#![cfg(test)]`: the whole file is test code
    }
    while i < toks.len() {
        let t = &toks[i];
        if is_punct(Some(t), '#') && cfg_test_at(&toks, i + 1) {
            i = skip_test_item(&toks, i + 7, &current(&inline), &mut scan);
            continue;
        }
        match &t.0 {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d > depth) {
                    inline.pop();
                }
            }
            Tok::Ident(s) if s == "mod" => {
                if let (Some((Tok::Ident(name), _)), true) =
                    (toks.get(i + 1), is_punct(toks.get(i + 2), '{'))
                {
                    inline.push((name.clone(), depth + 1));
                    scan.inline.push(current(&inline));
                }
            }
            Tok::Ident(s)
                if (s == "crate" || s == "super" || s == "self")
                    && is_path(toks.get(i + 1))
                    && !is_path(i.checked_sub(1).and_then(|p| toks.get(p)))
                    && !is_punct(i.checked_sub(1).and_then(|p| toks.get(p)), '$') =>
            {
                let from = current(&inline);
                let mut base = match s.as_str() {
                    "crate" => Vec::new(),
                    "self" => from.clone(),
                    _ => from[..from.len().saturating_sub(1)].to_vec(),
                };
                let mut j = i + 2;
                while is_ident(toks.get(j), "super") && is_path(toks.get(j + 1)) {
                    base.pop();
                    j += 2;
                }
                let (paths, end) = path_tree(&toks, j, base);
                for path in paths {
                    scan.references.push(Reference {
                        from: from.clone(),
                        path,
                        line: t.1,
                    });
                }
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    scan
}

/// `[cfg(test)]` starts at `i`.
fn cfg_test_at(toks: &[(Tok, usize)], i: usize) -> bool {
    is_punct(toks.get(i), '[')
        && is_ident(toks.get(i + 1), "cfg")
        && is_punct(toks.get(i + 2), '(')
        && is_ident(toks.get(i + 3), "test")
        && is_punct(toks.get(i + 4), ')')
        && is_punct(toks.get(i + 5), ']')
}

/// Skips the item after `#[cfg(test)]` (to its `;` or its closing brace),
/// noting `mod x;` declarations of test-only files.
fn skip_test_item(
    toks: &[(Tok, usize)],
    mut i: usize,
    module: &[String],
    scan: &mut Scan,
) -> usize {
    let mut saw_mod = None;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct(';') => {
                if let Some(name) = saw_mod {
                    let mut m = module.to_vec();
                    m.push(name);
                    scan.test_only.push(m);
                }
                return i + 1;
            }
            Tok::Punct('{') => {
                let mut depth = 0;
                while i < toks.len() {
                    match toks[i].0 {
                        Tok::Punct('{') => depth += 1,
                        Tok::Punct('}') => {
                            depth -= 1;
                            if depth == 0 {
                                return i + 1;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            Tok::Ident(s) if s == "mod" => {
                if let Some((Tok::Ident(name), _)) = toks.get(i + 1) {
                    saw_mod = Some(name.clone());
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The paths of a use tree (or of an inline path) starting at `i` under
/// `prefix`: `a::b`, `a::{b, c::d}`, `a::*`, `a::{self, b as c}`.
fn path_tree(
    toks: &[(Tok, usize)],
    mut i: usize,
    prefix: Vec<String>,
) -> (Vec<Vec<String>>, usize) {
    let mut path = prefix;
    loop {
        match toks.get(i).map(|t| &t.0) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                i += 1;
                if is_path(toks.get(i)) {
                    i += 1;
                    continue;
                }
                return (vec![path], i);
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                let mut all = Vec::new();
                while i < toks.len() && !is_punct(toks.get(i), '}') {
                    let (paths, end) = path_tree(toks, i, path.clone());
                    all.extend(paths);
                    i = end;
                    if is_ident(toks.get(i), "as") {
                        i += 2;
                    }
                    if is_punct(toks.get(i), ',') {
                        i += 1;
                    } else if !is_punct(toks.get(i), '}') {
                        i += 1; // not a use tree after all; keep going
                    }
                }
                return (all, i + 1);
            }
            _ => return (vec![path], i),
        }
    }
}

#[cfg(test)]
mod detector {
    //! The checker itself must find cycles, or the tests above cannot fail.
    use super::*;

    fn crate_with(files: &[(&str, &str)]) -> (tempfile::TempDir, Graph) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let graph = Graph::scan(dir.path());
        (dir, graph)
    }

    fn members(graph: &Graph) -> Vec<(String, Vec<String>)> {
        graph
            .cycles()
            .into_iter()
            .map(|c| (c.level, c.members))
            .collect()
    }

    #[test]
    fn finds_a_cycle_between_top_level_modules() {
        let (_d, g) = crate_with(&[
            ("lib.rs", "pub mod a; pub mod b; pub mod c;"),
            ("a.rs", "use crate::b::B;\npub struct A;"),
            ("b/mod.rs", "pub mod inner; pub struct B;"),
            ("b/inner.rs", "fn f() { let _ = crate::c::C; }"),
            ("c.rs", "use super::{a::A as X, b};\npub struct C;"),
        ]);
        assert_eq!(
            members(&g),
            [("".to_string(), vec!["a".into(), "b".into(), "c".into()])]
        );
        let cycle = &g.cycles()[0];
        assert!(cycle.describe("x").contains("b -> c   (b/inner.rs:1)"));
    }

    #[test]
    fn finds_a_cycle_between_submodules() {
        let (_d, g) = crate_with(&[
            ("lib.rs", "pub mod p;"),
            ("p/mod.rs", "pub mod x; pub mod y; use self::x::X;"),
            ("p/x.rs", "use super::y;\npub struct X;"),
            (
                "p/y.rs",
                "pub fn f() -> crate::p::x::X { super::super::p::x::X }",
            ),
        ]);
        assert_eq!(
            members(&g),
            [("p".to_string(), vec!["x".into(), "y".into()])]
        );
    }

    #[test]
    fn ignores_parents_comments_strings_and_tests() {
        let (_d, g) = crate_with(&[
            ("lib.rs", "pub mod a; pub mod b; #[cfg(test)] mod t;"),
            (
                "a.rs",
                "use crate::b;\n/// see crate::a::x\npub fn a() {}\n",
            ),
            (
                "b.rs",
                "const S: &str = \"crate::a::a\"; // crate::a\n\
                 #[cfg(test)]\nmod tests { use crate::a; }\n\
                 #[cfg(test)]\nfn helper() { crate::a::a() }\n",
            ),
            ("t.rs", "use crate::a; use crate::b;"),
        ]);
        assert!(members(&g).is_empty(), "{:?}", members(&g));
    }
}
