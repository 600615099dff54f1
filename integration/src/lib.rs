//! Root tests live in tests/.
