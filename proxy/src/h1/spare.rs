//! Read buffers kept per worker thread for the next head: a client's
//! request heads ([`crate::h1`]) and machines' response heads
//! ([`crate::forwarding::upstream`]).
//!
//! A head is parsed in place: its header values share the buffer it was
//! read into, so that buffer is only free again once the head is gone. A
//! new 8 KiB buffer for every head, freed after, is the allocator's slow
//! path (and, 8 KiB at a time, its cache garbage collection every few
//! requests). So buffers come back here when their reader lets go of them:
//! at once ready for another head when nothing shares them, or held until
//! the head that does is gone (a response head lives until the response
//! has been written to the client, after its connection went back to the
//! pool).

use bytes::BytesMut;
use std::cell::RefCell;
use std::collections::VecDeque;

/// A buffer's size: hyper's read size, so a small body usually comes along
/// with its head (and under jemalloc's largest small size class, 14 KiB).
pub(crate) const CHUNK: usize = 8 * 1024;

/// Buffers kept per worker, at most, ready and held each.
const MAX: usize = 64;

/// Held buffers looked at for a free one per [`take`]: the oldest are the
/// likeliest free, and a buffer whose head lives long (a streamed
/// response) should not make every take look at all of them.
const LOOK_AT: usize = 4;

#[derive(Default)]
struct Spare {
    /// Nothing shares these: ready for a head.
    ready: Vec<BytesMut>,
    /// Still shared with a head when given back; oldest first.
    held: VecDeque<BytesMut>,
}

thread_local! {
    static SPARE: RefCell<Spare> = RefCell::default();
}

/// An empty buffer of [`CHUNK`] bytes at least.
pub(crate) fn take() -> BytesMut {
    SPARE
        .with(|spare| {
            let mut spare = spare.borrow_mut();
            if let Some(buf) = spare.ready.pop() {
                return Some(buf);
            }
            for _ in 0..LOOK_AT.min(spare.held.len()) {
                let mut buf = spare.held.pop_front()?;
                if buf.try_reclaim(CHUNK) {
                    return Some(buf);
                }
                spare.held.push_back(buf);
            }
            None
        })
        .unwrap_or_else(|| BytesMut::with_capacity(CHUNK))
}

/// Gives `buf` back for another head; what it holds is dropped.
pub(crate) fn give(mut buf: BytesMut) {
    buf.clear();
    // (None yet: nothing to keep. One grown for a large head: not worth
    // keeping.)
    if buf.capacity() == 0 || buf.capacity() > 2 * CHUNK {
        return;
    }
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if buf.try_reclaim(CHUNK) {
            if spare.ready.len() < MAX {
                spare.ready.push(buf);
            }
            return;
        }
        // Full: the oldest goes (its bytes are freed with their head).
        if spare.held.len() == MAX {
            spare.held.pop_front();
        }
        spare.held.push_back(buf);
    });
}

/// How many buffers this thread keeps: ready, held.
#[cfg(test)]
pub(crate) fn kept() -> (usize, usize) {
    SPARE.with(|spare| {
        let spare = spare.borrow();
        (spare.ready.len(), spare.held.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_once_their_head_is_gone() {
        let mut buf = take();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = buf.split().freeze();
        let at = head.as_ptr();
        give(buf);
        assert_eq!(kept(), (0, 1), "held while its head lives");
        let other = take();
        assert_ne!(other.as_ptr(), at, "not while its head lives");
        assert_eq!(kept(), (0, 1));
        drop(head);

        let buf = take();
        assert_eq!(buf.as_ptr(), at, "the same bytes, from the start");
        assert!(buf.capacity() >= CHUNK);
        assert_eq!(kept(), (0, 0));
        give(buf);
        give(other);
        assert_eq!(kept(), (2, 0), "nothing shares them: ready");
        give(BytesMut::new());
        assert_eq!(kept(), (2, 0), "an empty handle is not kept");
    }

    #[test]
    fn held_buffers_are_bounded() {
        let heads: Vec<_> = (0..MAX + 3)
            .map(|_| {
                let mut buf = take();
                buf.extend_from_slice(b"x");
                let head = buf.split().freeze();
                give(buf);
                head
            })
            .collect();
        assert_eq!(kept(), (0, MAX));
        drop(heads);
        assert_eq!(take().capacity(), CHUNK, "the oldest held is free now");
    }
}
