//! Settings (`KEY=VALUE`) and the env files that hold them.

use super::words::unquote;

/// One setting as a file writes it, and where.
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: String,
    pub value: String,
    /// `file:line`, for messages.
    pub at: String,
}

impl Setting {
    /// A setting of `key`, which must be a variable name (`TUNNEL_X`).
    pub fn new(key: &str, value: &str, at: impl Into<String>) -> Setting {
        let at = at.into();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "{at}: '{key}' is not a variable name"
        );
        Setting { key: key.into(), value: value.into(), at }
    }
}

/// A `KEY=VALUE` file (`file` names it in messages): its settings, and its commented-out
/// `#TUNNEL_...=` examples.
pub fn env_file(text: &str, file: &str) -> (Vec<Setting>, Vec<Setting>) {
    let (mut on, mut off) = (vec![], vec![]);
    for (i, l) in text.lines().enumerate() {
        let t = l.trim();
        let (list, t) = match t.strip_prefix('#') {
            Some(c) if c.starts_with("TUNNEL_") => (&mut off, c),
            Some(_) => continue,
            None if t.is_empty() => continue,
            None => (&mut on, t),
        };
        let (k, v) = t.split_once('=').unwrap_or_else(|| panic!("{file}:{}: not KEY=VALUE", i + 1));
        list.push(Setting::new(k.trim(), &unquote(v.trim()), format!("{file}:{}", i + 1)));
    }
    (on, off)
}
