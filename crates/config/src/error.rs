//! Errors. Every problem found in the config text is an [`Issue`] (file, position, kind, message);
//! the loader collects as many as it can and returns them together in [`Error::Invalid`].

use std::fmt;
use std::path::{Path, PathBuf};

use crate::pos::Pos;

/// What kind of problem an [`Issue`] is; tests and callers can match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IssueKind {
    /// Not valid YAML (including tabs used for indentation).
    Syntax,
    /// Over one of the loader's limits: aliases, nesting, document count.
    Limit,
    /// A document that is not a mapping, or has neither `kind:` nor `version:`.
    Document,
    /// Two documents of the same unnamed kind, or of the same kind and name.
    Duplicate,
    /// A key our own document does not know (the message suggests the nearest one).
    UnknownKey,
    /// A value of the wrong YAML type (a list where a string was expected, ...).
    Type,
    /// A value of the right type that is not acceptable (bad CIDR, port out of range, ...).
    Value,
    /// Values that are fine alone but not together (listening on Talos's host DNS address, ...).
    Conflict,
}

/// One problem in the config text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub origin: PathBuf,
    pub pos: Option<Pos>,
    pub kind: IssueKind,
    pub message: String,
}

impl Issue {
    pub fn new(
        origin: &Path,
        pos: Option<Pos>,
        kind: IssueKind,
        message: impl Into<String>,
    ) -> Self {
        Issue {
            origin: origin.to_owned(),
            pos,
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(pos) => write!(f, "{}:{}: {}", self.origin.display(), pos, self.message),
            None => write!(f, "{}: {}", self.origin.display(), self.message),
        }
    }
}

/// A config error. `Display` starts with `file:line:column:` where the position is known; for
/// several issues it prints one per line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file or text is over [`crate::MAX_CONFIG_BYTES`]; refused before it is read.
    #[error("{}: config is {size} bytes, over the {limit}-byte limit", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// The path is not a regular file (a FIFO, a socket, a device, a directory): refused without reading.
    #[error("{}: is a {kind}, not a regular file: the config must be a regular file (or a symlink to one)", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    /// The file is not UTF-8 text.
    #[error("{}: config is not UTF-8 text (invalid byte at offset {offset})", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
    /// The text was read but is not a valid config: one or more issues, in file order.
    #[error("{}", display_issues(issues))]
    Invalid { issues: Vec<Issue> },
}

/// What a non-regular file is, for [`Error::NotRegular`].
pub(crate) fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

fn display_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(Issue::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    /// True when the config file does not exist (a daemon then runs on defaults and waits for it).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// The issues found in the text (empty for I/O, size and encoding errors).
    pub fn issues(&self) -> &[Issue] {
        match self {
            Error::Invalid { issues } => issues,
            _ => &[],
        }
    }

    /// True when some issue is of `kind`.
    pub fn has(&self, kind: IssueKind) -> bool {
        self.issues().iter().any(|i| i.kind == kind)
    }
}
