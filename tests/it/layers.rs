//! The import rule of `src/lib.rs`, checked on the tree: `core` ← `crypto` ← `adapters` ←
//! `node` ← `edge`. Every `crate::<folder>` path in non-test code must name the file's own
//! folder or one to its left; files stay under the size bound; adapters import no other adapter
//! but `durable`. Test modules (`#[cfg(test)] mod …` and `tests.rs` files) may use the
//! development federation from `edge` as a fixture, so they are not checked.

use std::fs;
use std::path::{Path, PathBuf};

const LAYERS: [&str; 5] = ["core", "crypto", "adapters", "node", "edge"];
const MAX_LINES: usize = 800;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text before its first `#[cfg(test)]` item (tests come last, by house style).
fn non_test_text(path: &Path) -> Option<String> {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return None;
    }
    let text = fs::read_to_string(path).unwrap();
    Some(match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_owned(),
        None => text,
    })
}

fn layer_of(rel: &Path) -> Option<usize> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    LAYERS.iter().position(|l| *l == first)
}

/// Every `crate::folder[::module]` mentioned in `text`, comments excluded.
fn crate_paths(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let mut parts = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or("")
                .split("::");
            let folder = parts.next().unwrap_or("").to_owned();
            let module = parts.next().map(str::to_owned).filter(|m| !m.is_empty());
            out.push((folder, module));
        }
    }
    out
}

#[test]
fn no_file_imports_a_higher_layer_and_none_is_oversized() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        let Some(text) = non_test_text(path) else {
            continue;
        };
        let lines = text.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{}: {lines} non-test lines (> {MAX_LINES})",
                rel.display()
            ));
        }
        let Some(mine) = layer_of(rel) else {
            continue; // lib.rs, main.rs
        };
        let my_module = rel.components().nth(1).and_then(|c| {
            Path::new(c.as_os_str())
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_owned)
        });
        for (folder, module) in crate_paths(&text) {
            let Some(theirs) = LAYERS.iter().position(|l| *l == folder) else {
                problems.push(format!("{}: crate::{folder} is not a layer", rel.display()));
                continue;
            };
            if theirs > mine {
                problems.push(format!(
                    "{}: imports crate::{folder} (layer {theirs}) from layer {mine}",
                    rel.display()
                ));
            }
            if mine == 2 && theirs == 2 {
                let (m, mm) = (module.as_deref(), my_module.as_deref());
                if m != mm && m != Some("durable") {
                    problems.push(format!(
                        "{}: adapter imports another adapter, crate::adapters::{}",
                        rel.display(),
                        m.unwrap_or("?")
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layer rule broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_an_upward_import() {
    let found = crate_paths("use crate::node::run::Handles; // crate::edge in a comment");
    assert_eq!(found, vec![("node".to_owned(), Some("run".to_owned()))]);
}
