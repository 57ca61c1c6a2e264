//! Walking the messages of a netlink datagram (pure), for the collectors that read the
//! kernel's netlink interfaces (procmond's process events, netmond's socket dump).

/// A netlink message header's length.
pub const NLMSG_HDRLEN: usize = 16;
/// `NLMSG_ERROR`.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;

/// The native-endian `u16` at `at`, if there.
#[must_use]
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// The native-endian `u32` at `at`, if there.
#[must_use]
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// One message: its type, sequence number and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlMsg<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// What follows the header.
    pub body: &'a [u8],
}

impl NlMsg<'_> {
    /// For `NLMSG_ERROR`: the errno the kernel answered (positive; 0 is an acknowledgement).
    #[must_use]
    pub fn errno(&self) -> i32 {
        u32_at(self.body, 0).map_or(0, |e| (e as i32).saturating_neg())
    }
}

/// A message whose header announces more than the datagram holds, or less than a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// Bytes there.
    pub have: usize,
    /// Bytes announced, or the least a message needs.
    pub need: usize,
}

/// The messages of `datagram`, each aligned to 4 bytes; a damaged one ends the walk with
/// [`Truncated`]. Trailing bytes too short for a header are ignored.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<NlMsg<'_>, Truncated>> {
    let mut at = 0usize;
    let mut broken = false;
    std::iter::from_fn(move || {
        if broken || datagram.len().saturating_sub(at) < NLMSG_HDRLEN {
            return None;
        }
        let msg = &datagram[at..];
        let len = u32_at(msg, 0).map_or(0, |l| l as usize);
        if len < NLMSG_HDRLEN || len > msg.len() {
            broken = true;
            return Some(Err(Truncated {
                have: msg.len(),
                need: len.max(NLMSG_HDRLEN),
            }));
        }
        at = at.saturating_add((len + 3) & !3);
        Some(Ok(NlMsg {
            kind: u16_at(msg, 4).unwrap_or(0),
            seq: u32_at(msg, 8).unwrap_or(0),
            body: &msg[NLMSG_HDRLEN..len],
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(
            &u32::try_from(NLMSG_HDRLEN + body.len())
                .unwrap()
                .to_ne_bytes(),
        );
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 2]);
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn messages_are_walked_aligned_and_damage_ends_the_walk() {
        let mut d = message(7, 1, &[1, 2, 3]);
        d.push(0); // padding to 4 bytes
        d.extend(message(NLMSG_ERROR, 2, &(-13i32).to_ne_bytes()));
        let all: Vec<_> = messages(&d).collect();
        assert_eq!(all.len(), 2);
        let first = all[0].unwrap();
        assert_eq!(
            (first.kind, first.seq, first.body),
            (7, 1, &[1u8, 2, 3][..])
        );
        assert_eq!(all[1].unwrap().errno(), 13);
        // The last message's padding may run past the datagram.
        let short = message(7, 1, &[1]);
        assert_eq!(messages(&short).count(), 1);
        let mut cut = message(7, 1, &[0; 8]);
        cut.truncate(20);
        assert_eq!(
            messages(&cut).collect::<Vec<_>>(),
            [Err(Truncated { have: 20, need: 24 })]
        );
    }
}
