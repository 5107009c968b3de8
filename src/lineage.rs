//! Thread lineage: which interception a tool result answers.
//!
//! When an interception records tool calls, their ids are remembered here, so the next request
//! whose last message is a tool result can be attached to the same thread without a database
//! round trip (the producing record may still be in the recorder queue). Ids are kept per user:
//! a tool-call id is text the client chose, so another user's equal id links nothing. The index
//! is bounded: two generations of at most `capacity` ids each; the older generation is dropped
//! whole.
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

/// Tool-call ids by the user whose interception made them.
type Generation = HashMap<(Uuid, String), ThreadLink>;

pub struct ThreadIndex {
    generations: Mutex<(Generation, Generation)>,
    capacity: usize,
}

impl ThreadIndex {
    pub fn new(capacity: usize) -> ThreadIndex {
        ThreadIndex {
            generations: Mutex::new((HashMap::new(), HashMap::new())),
            capacity,
        }
    }

    pub fn remember(&self, user: Uuid, tool_call_id: &str, link: ThreadLink) {
        let mut g = self.generations.lock();
        if g.0.len() >= self.capacity {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert((user, tool_call_id.to_string()), link);
    }

    pub fn find(&self, user: Uuid, tool_call_id: &str) -> Option<ThreadLink> {
        let g = self.generations.lock();
        let key = (user, tool_call_id.to_string());
        g.0.get(&key).or_else(|| g.1.get(&key)).copied()
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
        let u = Uuid::from_u128(7);
        idx.remember(u, "a", l(1));
        idx.remember(u, "b", l(2));
        idx.remember(u, "c", l(3)); // a, b move to the old generation
        assert_eq!(idx.find(u, "a"), Some(l(1)));
        idx.remember(u, "d", l(4));
        idx.remember(u, "e", l(5)); // c, d become old; a, b are gone
        assert_eq!(idx.find(u, "a"), None);
        assert_eq!(idx.find(u, "c"), Some(l(3)));
        assert_eq!(idx.find(u, "e"), Some(l(5)));
    }

    #[test]
    fn another_users_equal_id_links_nothing() {
        let idx = ThreadIndex::new(8);
        let (alice, bob) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let link = ThreadLink {
            parent: Uuid::from_u128(10),
            root: Uuid::from_u128(10),
        };
        idx.remember(alice, "call_1", link);
        assert_eq!(idx.find(alice, "call_1"), Some(link));
        assert_eq!(idx.find(bob, "call_1"), None);
    }
}
