//! OpenAI `stop` strings applied to streamed text.
//!
//! Generated text arrives in pieces, and a stop string may straddle two of them, so
//! text that could still turn out to be the start of a stop string is held back
//! until the next piece decides it. What is sent is then exactly the text before the
//! first stop string, streamed or not.

/// Holds back the text that might begin a stop string.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Text that can be sent now.
    pub text: String,
    /// A stop string was found: `text` ends just before it and generation should end.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored: they would match at once).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Appends newly generated `text`.
    pub fn push(&mut self, text: &str) -> Released {
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.pending.truncate(at);
            return Released {
                text: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| partial_match(&self.pending, s))
            .max()
            .unwrap_or(0);
        let rest = self.pending.split_off(self.pending.len() - hold);
        Released {
            text: std::mem::replace(&mut self.pending, rest),
            stopped: false,
        }
    }

    /// The text held back when generation ended for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn partial_match(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .map(|(i, _)| i)
        .filter(|&k| k > 0 && text.ends_with(&stop[..k]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out += &r.text;
            if r.stopped {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stop_inside_one_piece_cuts_before_it() {
        assert_eq!(run(&["\n\n"], &["a\n\nb"]), ("a".into(), true));
    }

    #[test]
    fn stop_across_pieces_is_found_and_never_sent() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abcE").text, "abc");
        assert_eq!(m.push("N").text, "");
        let r = m.push("Dxyz");
        assert_eq!((r.text.as_str(), r.stopped), ("", true));
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["END"], &["xE", "Nd", "!"]), ("xENd!".into(), false));
        assert_eq!(run(&["END"], &["xEN"]), ("xEN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "ab"], &["zabc"]), ("z".into(), true));
    }

    #[test]
    fn multibyte_prefixes_split_on_char_boundaries() {
        assert_eq!(run(&["éé"], &["aé", "b"]), ("aéb".into(), false));
        assert_eq!(run(&["éé"], &["aé", "éb"]), ("a".into(), true));
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("abc").text, "abc");
    }
}
