//! Plain-text tables for people: left-aligned columns, two spaces apart, `-` for empty cells.

use std::io::Write;

/// A table being built.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table { header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.into_iter().map(|c| if c.is_empty() { "-".into() } else { c }).collect());
    }

    /// Writes the table.
    pub fn write(&self, out: &mut dyn Write) -> anyhow::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        for line in std::iter::once(&self.header).chain(self.rows.iter()) {
            let mut s = String::new();
            for (i, c) in line.iter().enumerate() {
                if i + 1 == line.len() {
                    s.push_str(c);
                } else {
                    s.push_str(&format!("{c:<w$}  ", w = widths[i]));
                }
            }
            writeln!(out, "{}", s.trim_end())?;
        }
        Ok(())
    }
}
