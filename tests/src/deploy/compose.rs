//! The YAML of the compose files.

use super::words::{strip_comment, unquote};

/// A YAML value as the compose files write them: block maps, block lists of scalars, scalars.
#[derive(Debug, Clone)]
pub enum Yaml {
    Map(Vec<(String, Yaml, usize)>),
    List(Vec<(String, usize)>),
    Scalar(String),
}

impl Yaml {
    /// A whole file; panics at a line this reader does not read.
    pub fn parse(text: &str) -> Yaml {
        let lines: Vec<(usize, String, usize)> = text
            .lines()
            .enumerate()
            .filter_map(|(i, l)| {
                let l = strip_comment(l);
                let t = l.trim();
                (!t.is_empty()).then(|| (l.len() - l.trim_start().len(), t.to_owned(), i + 1))
            })
            .collect();
        let mut pos = 0;
        let doc = Yaml::block(&lines, &mut pos);
        assert!(pos == lines.len(), "line {}: not read by this reader", lines[pos].2);
        doc
    }

    fn block(lines: &[(usize, String, usize)], pos: &mut usize) -> Yaml {
        let indent = lines[*pos].0;
        if lines[*pos].1.starts_with("- ") {
            let mut items = vec![];
            while let Some((_, t, n)) = lines.get(*pos).filter(|l| l.0 == indent && l.1.starts_with("- ")) {
                assert!(!t[2..].contains(": "), "line {n}: lists of maps are not read by this reader");
                items.push((unquote(t[2..].trim()), *n));
                *pos += 1;
            }
            return Yaml::List(items);
        }
        let mut entries = vec![];
        while let Some((_, t, n)) = lines.get(*pos).filter(|l| l.0 == indent) {
            let n = *n;
            let (k, v) = t.split_once(':').unwrap_or_else(|| panic!("line {n}: not KEY: VALUE"));
            let (k, v) = (unquote(k.trim()), v.trim().to_owned());
            *pos += 1;
            let value = match lines.get(*pos) {
                Some((i, t, _)) if v.is_empty() && (*i > indent || (*i == indent && t.starts_with("- "))) => {
                    Yaml::block(lines, pos)
                }
                _ => Yaml::Scalar(unquote(&v)),
            };
            entries.push((k, value, n));
        }
        Yaml::Map(entries)
    }

    /// A map's value at `key`.
    pub fn get(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(e) => e.iter().find(|(k, _, _)| k == key).map(|(_, v, _)| v),
            _ => None,
        }
    }

    /// A scalar's text.
    pub fn str(&self) -> &str {
        match self {
            Yaml::Scalar(s) => s,
            other => panic!("expected a scalar, found {other:?}"),
        }
    }

    /// A scalar or a list of scalars.
    pub fn items(&self) -> Vec<String> {
        match self {
            Yaml::Scalar(s) => vec![s.clone()],
            Yaml::List(l) => l.iter().map(|(s, _)| s.clone()).collect(),
            Yaml::Map(_) => panic!("expected a list, found a map"),
        }
    }

    /// `KEY: VALUE` entries or `- KEY=VALUE` items, with their lines.
    pub fn pairs(&self) -> Vec<(String, String, usize)> {
        match self {
            Yaml::Map(e) => e.iter().map(|(k, v, n)| (k.clone(), v.str().to_owned(), *n)).collect(),
            Yaml::List(l) => l
                .iter()
                .map(|(s, n)| {
                    let (k, v) = s.split_once('=').unwrap_or_else(|| panic!("line {n}: not KEY=VALUE"));
                    (k.to_owned(), v.to_owned(), *n)
                })
                .collect(),
            Yaml::Scalar(s) => panic!("expected a map, found '{s}'"),
        }
    }
}
