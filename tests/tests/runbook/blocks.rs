use super::*;

// ---- the runbook's blocks ----------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) host: String,
    pub(crate) commands: String,
    pub(crate) expected: Option<String>,
}

/// Every tagged block of the runbook, by id.
pub(crate) fn blocks() -> BTreeMap<String, Block> {
    let mut out: BTreeMap<String, Block> = BTreeMap::new();
    let mut lines = RUNBOOK.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```") else { continue };
        let mut body = String::new();
        for (_, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        let mut words = info.split_whitespace();
        let (lang, tag) = (words.next().unwrap_or(""), words.find_map(|w| w.strip_prefix("rb:")));
        let Some(tag) = tag else { continue };
        let at = format!("deploy/RUNBOOK.md:{}", n + 1);
        match lang {
            "sh" => {
                let (id, host) = tag.split_once('@').unwrap_or_else(|| panic!("{at}: rb:ID@HOST"));
                assert!(["server", "relay", "site", "client"].contains(&host), "{at}: unknown host {host}");
                let b = Block { host: host.into(), commands: body, expected: None };
                assert!(out.insert(id.into(), b).is_none(), "{at}: block {id} twice");
            }
            "text" => {
                let b =
                    out.get_mut(tag).unwrap_or_else(|| panic!("{at}: output of {tag} before its commands"));
                assert!(b.expected.replace(body).is_none(), "{at}: two outputs for {tag}");
            }
            _ => panic!("{at}: a tagged block must be `sh rb:ID@HOST` or `text rb:ID`"),
        }
    }
    out
}

/// Collapses whitespace runs to one space and trims.
pub(crate) fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An expected line as literal pieces between wildcards (`<...>` placeholders and `...`).
pub(crate) fn pieces(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut rest = line;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("...") {
            out.push(String::new());
            rest = r;
            continue;
        }
        // A placeholder: `<` then at least one character up to the next `>`, with no `<` or newline.
        let placeholder = rest
            .strip_prefix('<')
            .and_then(|r| r.find(['<', '>', '\n']).filter(|&e| e > 0 && r.as_bytes()[e] == b'>'));
        if let Some(end) = placeholder {
            out.push(String::new());
            rest = &rest[end + 2..];
            continue;
        }
        let c = rest.chars().next().unwrap();
        out.last_mut().unwrap().push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into_iter().map(|p| squash(&p)).filter(|p| !p.is_empty()).collect()
}

/// Whether `line` holds the pieces in order.
pub(crate) fn line_matches(line: &str, pieces: &[String]) -> bool {
    let line = squash(line);
    let mut at = 0;
    for p in pieces {
        match line[at..].find(p.as_str()) {
            Some(i) => at += i + p.len(),
            None => return false,
        }
    }
    true
}

/// Checks output against an expected block: every expected line, in order, within some output line.
pub(crate) fn check_output(expected: &str, actual: &str) -> Result<(), String> {
    let lines: Vec<&str> = actual.lines().collect();
    let mut next = 0;
    for want in expected.lines() {
        let p = pieces(want);
        if p.is_empty() {
            continue;
        }
        match lines[next..].iter().position(|l| line_matches(l, &p)) {
            Some(i) => next += i + 1,
            None => return Err(format!("no line (from output line {}) matches: {want}", next + 1)),
        }
    }
    Ok(())
}
