//! No production function in `node/src/proxy/` over [`MAX_LINES`] lines of
//! code (issue 17): the HTTP/1 path was three functions of 277 to 300
//! lines each, parsing, policy, I/O and logging mixed, and a newcomer had
//! to hold a whole one in their head to change any line of it.
//!
//! Lines are counted the way clippy's `too_many_lines` counts them (blank
//! and comment-only lines left out), over the text as rustfmt writes it: a
//! function starts at a line whose first item is `fn` (after `pub`,
//! `async`...) and ends at the first later line that is its indentation
//! followed by `}`. A file's `#[cfg(test)]` module (at its end, by the
//! codebase's habit) is left out.

use std::path::{Path, PathBuf};

/// Most lines of code in one production function.
const MAX_LINES: usize = 120;

#[test]
fn proxy_functions_are_short() {
    let dir = charon_tests::repo_root().join("node/src/proxy");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(files.len() > 10, "scanned too few files under {dir:?}");
    let mut long = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (name, line, n) in functions(&text) {
            if n > MAX_LINES {
                long.push(format!("{}:{line} {name}: {n} lines", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_LINES} lines of code:\n{}",
        long.join("\n")
    );
}

/// Each function of `text` outside its test module: name, first line
/// (1-based) and lines of code.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].trim() == "#[cfg(test)]"
                && lines
                    .get(i + 1)
                    .is_some_and(|l| l.trim_start().starts_with("mod "))
        })
        .unwrap_or(lines.len());
    let mut out = Vec::new();
    for i in 0..end {
        let Some(name) = fn_name(lines[i]) else {
            continue;
        };
        let indent = &lines[i][..lines[i].len() - lines[i].trim_start().len()];
        let close = format!("{indent}}}");
        let Some(last) = (i + 1..end).find(|&j| lines[j] == close) else {
            continue; // a declaration without a body (a trait's)
        };
        let code = lines[i..=last]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .count();
        out.push((name, i + 1, code));
    }
    out
}

/// The function named on `line`, if the line starts one.
fn fn_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let mut w = words.next()?;
    while w.starts_with("pub") || matches!(w, "async" | "const" | "unsafe" | "extern" | "\"C\"") {
        w = words.next()?;
    }
    if w != "fn" {
        return None;
    }
    let name = words.next()?;
    let end = name.find(['(', '<']).unwrap_or(name.len());
    Some(name[..end].to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_counter_counts_code_lines_only() {
    let text = "fn short() {\n    // why\n\n    a();\n}\n\n    pub(super) async fn f<T>(\n        x: T,\n    ) {\n        b();\n    }\n#[cfg(test)]\nmod tests {\n    fn t() {\n    }\n}\n";
    assert_eq!(
        functions(text),
        [("short".to_string(), 1, 3), ("f".to_string(), 7, 5)]
    );
}
