//! The Dockerfile: its stages, and the `docker run` and options its comments document.

use std::collections::BTreeMap;

use super::env::Setting;
use super::words::split_words;

/// One build stage of the Dockerfile, with what it inherits from the stage it is built `FROM`.
#[derive(Debug, Clone, Default)]
pub struct Stage {
    pub env: Vec<Setting>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub healthcheck: Option<(Vec<String>, String)>,
    /// `COPY --chown=...` destinations: dirs the image gives its user.
    pub owned_dirs: Vec<String>,
    /// The comments before and inside the stage, with their lines.
    pub notes: Vec<(String, usize)>,
}

/// An instruction's exec form (`["prog", "arg"]`).
fn exec_form(s: &str, at: &str) -> Vec<String> {
    serde_json::from_str(s.trim())
        .unwrap_or_else(|e| panic!("{at}: only the exec form [\"...\"] is read here ({e})"))
}

/// The stages of a Dockerfile (`file` names it in messages), by their `AS` name.
pub fn stages(text: &str, file: &str) -> BTreeMap<String, Stage> {
    let (mut stages, mut cur, mut notes) =
        (BTreeMap::<String, Stage>::new(), None::<(String, Stage)>, vec![]);
    let (mut logical, mut start) = (String::new(), 0);
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if logical.is_empty() {
            if let Some(c) = t.strip_prefix('#') {
                notes.push((c.trim().to_owned(), i + 1));
                continue;
            }
            if t.is_empty() {
                continue;
            }
            start = i + 1;
        } else if t.starts_with('#') {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            logical.push_str(part);
            logical.push(' ');
            continue;
        }
        logical.push_str(t);
        let instr = std::mem::take(&mut logical);
        let (op, rest) = instr.split_once(char::is_whitespace).unwrap_or((&instr, ""));
        let (op, rest, at) = (op.to_ascii_uppercase(), rest.trim(), format!("{file}:{start}"));
        if op == "FROM" {
            if let Some((n, s)) = cur.take() {
                stages.insert(n, s);
            }
            let w: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let name = match w.as_slice() {
                [_, a, n] if a.eq_ignore_ascii_case("as") => n.to_string(),
                _ => String::new(),
            };
            let mut s = stages.get(w[0]).cloned().unwrap_or_default();
            s.notes = std::mem::take(&mut notes);
            cur = Some((name, s));
            continue;
        }
        let Some((_, s)) = cur.as_mut() else { continue };
        s.notes.append(&mut notes);
        match op.as_str() {
            "ENV" => {
                let words = split_words(rest);
                if words.first().is_some_and(|w| !w.contains('=')) {
                    s.env.push(Setting::new(&words[0], rest[words[0].len()..].trim(), at));
                } else {
                    for w in words {
                        let (k, v) = w.split_once('=').unwrap_or_else(|| panic!("{at}: ENV KEY=VALUE"));
                        s.env.push(Setting::new(k, v, at.clone()));
                    }
                }
            }
            "USER" => s.user = Some(rest.to_owned()),
            // Docker: an ENTRYPOINT resets the CMD inherited from the base.
            "ENTRYPOINT" => (s.entrypoint, s.cmd) = (exec_form(rest, &at), vec![]),
            "CMD" => s.cmd = exec_form(rest, &at),
            "HEALTHCHECK" => {
                let cmd = if rest.starts_with("CMD ") { Some(0) } else { rest.find(" CMD ").map(|i| i + 1) };
                s.healthcheck = cmd.map(|i| (exec_form(&rest[i + 4..], &at), at));
            }
            "COPY" | "ADD" if rest.contains("--chown=") => {
                s.owned_dirs.push(rest.split_whitespace().last().unwrap_or_default().to_owned())
            }
            _ => {}
        }
    }
    if let Some((n, s)) = cur {
        stages.insert(n, s);
    }
    stages
}

/// The `docker run` a stage's comments document: its `--user`, and its `-e` settings.
pub fn docker_run(stage: &Stage, file: &str) -> Option<(Option<String>, Vec<Setting>)> {
    let mut words = vec![];
    for (c, n) in stage.notes.iter().skip_while(|(c, _)| !c.starts_with("docker run ")) {
        words.extend(c.trim_end_matches('\\').split_whitespace().map(|w| (w.to_owned(), *n)));
        if !c.ends_with('\\') {
            break;
        }
    }
    if words.is_empty() {
        return None;
    }
    let (mut user, mut env) = (None, vec![]);
    for w in words.windows(2) {
        match w[0].0.as_str() {
            "--user" | "-u" => user = Some(w[1].0.clone()),
            "-e" | "--env" => {
                let (k, v) =
                    w[1].0.split_once('=').unwrap_or_else(|| panic!("{file}:{}: -e KEY=VALUE", w[1].1));
                env.push(Setting::new(k, v, format!("{file}:{}", w[1].1)));
            }
            _ => {}
        }
    }
    Some((user, env))
}

/// `TUNNEL_X=VALUE` options a stage's comments offer outside its `docker run` example.
pub fn documented_options(stage: &Stage, file: &str) -> Vec<Setting> {
    let (mut continued, mut out) = (false, vec![]);
    for (c, n) in &stage.notes {
        let in_run = continued || c.starts_with("docker run ");
        continued = in_run && c.ends_with('\\');
        if in_run {
            continue;
        }
        for w in c.split_whitespace().filter(|w| w.starts_with("TUNNEL_") && w.contains('=')) {
            let w = w.trim_end_matches([')', ',', ';', '.', '`']);
            let (k, v) = w.split_once('=').expect("the filter keeps words with '='");
            out.push(Setting::new(k, v, format!("{file}:{n}")));
        }
    }
    out
}
