//! Tokenizers built from vocabulary lists (being written).
