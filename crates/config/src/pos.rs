//! A position in the config text: what every parse and validation error names. Its own module, below both the
//! YAML layer and the errors, so neither imports the other for it.

use std::fmt;

/// A position in the config text (1-based line and column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}
