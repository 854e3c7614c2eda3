//! The crate's layout, checked: no import cycle between its files.
//!
//! A file depends on another when it names a path into it from the crate root
//! or a parent (`use crate::a::b`, `super::x::Y`, `self::…`, or such a path
//! inline in code). `mod` declarations are not edges, nor a parent's relative
//! paths to its own children (`pub use child::X` in a `mod.rs`: the parent
//! presenting its children), nor code under `#[cfg(test)]` (tests may look
//! anywhere). The test reads the sources themselves, starting at `lib.rs` and
//! following `mod` declarations, so it costs no extra build.

mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        path::{Path, PathBuf},
    };

    use syn::visit::Visit;

    /// A module path from the crate root (`["serve", "proto"]`).
    type ModPath = Vec<String>;

    /// One source file of the crate and the module path it holds.
    struct SourceFile {
        module: ModPath,
        path: PathBuf,
        ast: syn::File,
    }

    fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
        attrs.iter().any(|a| {
            a.path().is_ident("cfg")
                && a.meta
                    .require_list()
                    .is_ok_and(|l| l.tokens.to_string().trim() == "test")
        })
    }

    /// Every file of the crate reachable from `lib.rs` through `mod` declarations
    /// that are not `#[cfg(test)]`.
    fn crate_files(src: &Path) -> Vec<SourceFile> {
        let mut out = Vec::new();
        let mut todo = vec![(Vec::new(), src.join("lib.rs"))];
        while let Some((module, path)) = todo.pop() {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Where this file's child modules live: beside `lib.rs`/`mod.rs`, in a
            // directory named after the module otherwise.
            let dir = match path.file_name().and_then(|n| n.to_str()) {
                Some("lib.rs" | "mod.rs") => path.parent().unwrap().to_path_buf(),
                _ => path.with_extension(""),
            };
            for item in &ast.items {
                let names = match item {
                    syn::Item::Mod(m) if m.content.is_none() && !is_cfg_test(&m.attrs) => {
                        vec![m.ident.to_string()]
                    }
                    // lib.rs declares its internal modules through a macro.
                    syn::Item::Macro(m) if m.mac.path.is_ident("internal_modules") => {
                        macro_module_names(m.mac.tokens.clone())
                    }
                    _ => continue,
                };
                for name in names {
                    let file = [
                        dir.join(format!("{name}.rs")),
                        dir.join(&name).join("mod.rs"),
                    ]
                    .into_iter()
                    .find(|p| p.exists())
                    .unwrap_or_else(|| panic!("no file for mod {name} in {}", dir.display()));
                    let mut child = module.clone();
                    child.push(name);
                    todo.push((child, file));
                }
            }
            out.push(SourceFile { module, path, ast });
        }
        out
    }

    /// The module names in an `internal_modules! { a; b; }` invocation: each
    /// identifier followed by `;` (attributes before a name are skipped).
    fn macro_module_names(tokens: proc_macro2::TokenStream) -> Vec<String> {
        let tokens: Vec<_> = tokens.into_iter().collect();
        tokens
            .windows(2)
            .filter_map(|w| match (&w[0], &w[1]) {
                (proc_macro2::TokenTree::Ident(i), proc_macro2::TokenTree::Punct(p))
                    if p.as_char() == ';' =>
                {
                    Some(i.to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// Paths named in a file, each as written (with `crate`/`super`/`self`), and
    /// the module they are written in (a file's module, or an inline one in it).
    struct PathCollector {
        module: ModPath,
        found: Vec<(ModPath, Vec<String>)>,
    }

    impl PathCollector {
        fn push(&mut self, segments: Vec<String>) {
            if matches!(
                segments.first().map(String::as_str),
                Some("crate" | "super" | "self")
            ) {
                self.found.push((self.module.clone(), segments));
            }
        }

        fn use_tree(&mut self, prefix: &[String], tree: &syn::UseTree) {
            match tree {
                syn::UseTree::Path(p) => {
                    let mut v = prefix.to_vec();
                    v.push(p.ident.to_string());
                    self.use_tree(&v, &p.tree);
                }
                syn::UseTree::Name(n) => {
                    let mut v = prefix.to_vec();
                    v.push(n.ident.to_string());
                    self.push(v);
                }
                syn::UseTree::Rename(r) => {
                    let mut v = prefix.to_vec();
                    v.push(r.ident.to_string());
                    self.push(v);
                }
                syn::UseTree::Glob(_) => self.push(prefix.to_vec()),
                syn::UseTree::Group(g) => {
                    for t in &g.items {
                        self.use_tree(prefix, t);
                    }
                }
            }
        }
    }

    impl<'ast> Visit<'ast> for PathCollector {
        fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
            if is_cfg_test(&m.attrs) {
                return;
            }
            if m.content.is_some() {
                self.module.push(m.ident.to_string());
                syn::visit::visit_item_mod(self, m);
                self.module.pop();
            }
        }
        fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
            if !is_cfg_test(&f.attrs) {
                syn::visit::visit_item_fn(self, f);
            }
        }
        fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
            if !is_cfg_test(&i.attrs) {
                syn::visit::visit_item_impl(self, i);
            }
        }
        fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
            if !is_cfg_test(&u.attrs) {
                self.use_tree(&[], &u.tree);
            }
        }
        fn visit_path(&mut self, p: &'ast syn::Path) {
            self.push(p.segments.iter().map(|s| s.ident.to_string()).collect());
            syn::visit::visit_path(self, p);
        }
    }

    /// The file a path written in `module` leads into: its module path made
    /// absolute, cut at the deepest module that has a file.
    fn resolve(
        files: &BTreeMap<ModPath, PathBuf>,
        module: &ModPath,
        segments: &[String],
    ) -> Option<PathBuf> {
        let mut at: ModPath = match segments.first()?.as_str() {
            "crate" => Vec::new(),
            _ => module.clone(),
        };
        let mut rest = segments;
        if rest[0] == "crate" || rest[0] == "self" {
            rest = &rest[1..];
        }
        while rest.first().map(String::as_str) == Some("super") {
            at.pop()?;
            rest = &rest[1..];
        }
        // The module path as far as files go (an inline module resolves to its file).
        let mut best = None;
        let mut probe = at.clone();
        for depth in 0..=rest.len() {
            if depth > 0 {
                probe.push(rest[depth - 1].clone());
            }
            let mut m = probe.clone();
            while !m.is_empty() && !files.contains_key(&m) {
                m.pop();
            }
            if files.contains_key(&m) {
                best = files.get(&m).cloned();
            }
        }
        best
    }

    /// The file → files it names.
    fn graph(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
        let files = crate_files(src);
        let by_module: BTreeMap<ModPath, PathBuf> = files
            .iter()
            .map(|f| (f.module.clone(), f.path.clone()))
            .collect();
        let mut g: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
        for f in &files {
            let mut c = PathCollector {
                module: f.module.clone(),
                found: Vec::new(),
            };
            c.visit_file(&f.ast);
            let edges = g.entry(f.path.clone()).or_default();
            for (module, segments) in c.found {
                if let Some(to) = resolve(&by_module, &module, &segments) {
                    if to != f.path {
                        edges.insert(to);
                    }
                }
            }
        }
        g
    }

    /// One cycle per strongly connected component of more than one file.
    fn cycles(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
        // Files that reach each other: a cycle.
        let reach = |from: &PathBuf| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![from.clone()];
            while let Some(n) = todo.pop() {
                for m in g.get(&n).into_iter().flatten() {
                    if seen.insert(m.clone()) {
                        todo.push(m.clone());
                    }
                }
            }
            seen
        };
        let reaches: BTreeMap<&PathBuf, BTreeSet<PathBuf>> =
            g.keys().map(|k| (k, reach(k))).collect();
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        for (a, ra) in &reaches {
            if done.contains(*a) || !ra.contains(*a) {
                continue;
            }
            let comp: Vec<PathBuf> = ra
                .iter()
                .filter(|b| reaches.get(b).is_some_and(|rb| rb.contains(*a)))
                .cloned()
                .collect();
            done.extend(comp.iter().cloned());
            out.push(comp);
        }
        out
    }

    #[test]
    fn no_import_cycle_between_files() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let g = graph(&src);
        assert!(g.len() > 50, "the walk found only {} files", g.len());
        let found = cycles(&g);
        let show: Vec<String> = found
            .iter()
            .map(|c| {
                c.iter()
                    .map(|p| p.strip_prefix(&src).unwrap_or(p).display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ↔ ")
            })
            .collect();
        assert!(
            show.is_empty(),
            "import cycles between files:\n{}",
            show.join("\n")
        );
    }

    /// The walker itself: a made-up tree with one cycle and one test-only edge.
    #[test]
    fn the_walker_sees_uses_inline_paths_and_skips_tests() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path();
        std::fs::create_dir_all(src.join("a")).unwrap();
        std::fs::write(
            src.join("lib.rs"),
            "pub mod a;\npub mod b;\n#[cfg(test)]\nmod t;\n",
        )
        .unwrap();
        std::fs::write(
            src.join("a/mod.rs"),
            "pub mod x;\npub fn f() { crate::b::g(); }\n",
        )
        .unwrap();
        std::fs::write(src.join("a/x.rs"), "use super::super::b::{self, G};\n").unwrap();
        std::fs::write(
            src.join("b.rs"),
            "pub fn g() {}\npub struct G;\nuse crate::a::f;\n#[cfg(test)]\nmod tests { use crate::a::x; }\n",
        )
        .unwrap();
        std::fs::write(src.join("t.rs"), "use crate::a;\n").unwrap();
        let g = graph(src);
        assert_eq!(g.len(), 4, "{g:?}");
        let found = cycles(&g);
        assert_eq!(found.len(), 1, "{found:?}");
        let names: Vec<_> = found[0]
            .iter()
            .map(|p| p.strip_prefix(src).unwrap().to_owned())
            .collect();
        assert_eq!(names, [PathBuf::from("a/mod.rs"), PathBuf::from("b.rs")]);
        assert!(g[&src.join("a/x.rs")].contains(&src.join("b.rs")));
        assert!(
            !g[&src.join("b.rs")].contains(&src.join("a/x.rs")),
            "test-only edge"
        );
    }
}
