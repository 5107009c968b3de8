//! Thread lineage: which interception a tool result answers.
//!
//! When an interception records tool calls, their ids are remembered here, so the next request
//! whose last message is a tool result can be attached to the same thread without a database
//! round trip (the producing record may still be in the recorder queue). The index is bounded:
//! two generations of at most `capacity` ids each; the older generation is dropped whole.
//!
//! Not here: deciding the session key (the gateway does: client session, thread root, own id).

use std::collections::HashMap;

use parking_lot::Mutex;
use uuid::Uuid;

/// Where a tool call was made: the interception and its thread root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadLink {
    pub parent: Uuid,
    pub root: Uuid,
}

pub struct ThreadIndex {
    generations: Mutex<(HashMap<String, ThreadLink>, HashMap<String, ThreadLink>)>,
    capacity: usize,
}

impl ThreadIndex {
    pub fn new(capacity: usize) -> ThreadIndex {
        ThreadIndex {
            generations: Mutex::new((HashMap::new(), HashMap::new())),
            capacity,
        }
    }

    pub fn remember(&self, tool_call_id: &str, link: ThreadLink) {
        let mut g = self.generations.lock();
        if g.0.len() >= self.capacity {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(tool_call_id.to_string(), link);
    }

    pub fn find(&self, tool_call_id: &str) -> Option<ThreadLink> {
        let g = self.generations.lock();
        g.0.get(tool_call_id)
            .or_else(|| g.1.get(tool_call_id))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_two_generations() {
        let idx = ThreadIndex::new(2);
        let l = |n: u128| ThreadLink {
            parent: Uuid::from_u128(n),
            root: Uuid::from_u128(n),
        };
        idx.remember("a", l(1));
        idx.remember("b", l(2));
        idx.remember("c", l(3)); // a, b move to the old generation
        assert_eq!(idx.find("a"), Some(l(1)));
        idx.remember("d", l(4));
        idx.remember("e", l(5)); // c, d become old; a, b are gone
        assert_eq!(idx.find("a"), None);
        assert_eq!(idx.find("c"), Some(l(3)));
        assert_eq!(idx.find("e"), Some(l(5)));
    }
}
