//! Cuts one input into chunks the way a network might, deterministically from a seed, so a
//! crash reproduces from its artifact alone.

/// Splits `data` into pieces of 1..=max_len bytes, sizes drawn from a xorshift seeded by `seed`.
pub fn chunks(data: &[u8], seed: u8, max_len: usize) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 0x9e37_0000;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = (state as usize % max_len.max(1)) + 1;
        let (piece, after) = rest.split_at(len.min(rest.len()));
        out.push(piece);
        rest = after;
    }
    out
}
