//! WebSocket frames, server side (RFC 6455 §5): the client's masked frames parsed and unmasked in
//! place, and the headers of our unmasked frames.
//!
//! [`Decoder`] is a push parser with no buffer of its own for data: it is handed whatever bytes
//! were read from the client, and hands back payload pieces as slices of those same bytes,
//! unmasked where they lie. A data message is passed on piece by piece as it arrives (a bridge
//! carries bytes, it has no use for whole messages), so neither a large message nor a slow one
//! costs memory here. What it keeps between reads is a few dozen bytes: a header split across
//! reads, the frame and message in progress, up to 3 bytes of an unfinished UTF-8 sequence, and
//! (rarely) a control frame's payload split across reads (at most 125 bytes).
//!
//! Everything the RFC asks a server to refuse is refused, with the close code for it
//! ([`FrameError::code`]): unmasked frames, reserved bits, unknown opcodes, fragmented or oversized
//! control frames, continuations out of place, bad close payloads (1002); invalid UTF-8 in a text
//! message or a close reason (1007); messages over the route's limit (1009).

/// Continuation frame.
pub const CONTINUATION: u8 = 0x0;
/// Text frame.
pub const TEXT: u8 = 0x1;
/// Binary frame.
pub const BINARY: u8 = 0x2;
/// Close frame.
pub const CLOSE: u8 = 0x8;
/// Ping frame.
pub const PING: u8 = 0x9;
/// Pong frame.
pub const PONG: u8 = 0xA;

/// An opcode's name, for trace lines.
pub fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        CONTINUATION => "continuation",
        TEXT => "text",
        BINARY => "binary",
        CLOSE => "close",
        PING => "ping",
        PONG => "pong",
        _ => "reserved",
    }
}

/// Largest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL: usize = 125;

/// Why the client's frames were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A protocol violation (close code 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message that is not UTF-8 (1007).
    #[error("invalid UTF-8 in text message")]
    Utf8,
    /// A close reason that is not UTF-8 (1007).
    #[error("invalid UTF-8 in close reason")]
    ReasonUtf8,
    /// A message over the route's limit (1009).
    #[error("message too big: {size} > {max} bytes")]
    TooBig {
        /// The message's size as far as it was announced.
        size: u64,
        /// The limit.
        max: u64,
    },
}

impl FrameError {
    /// The close code that tells the client what it did wrong.
    pub fn code(&self) -> u16 {
        match self {
            FrameError::Protocol(_) => 1002,
            FrameError::Utf8 | FrameError::ReasonUtf8 => 1007,
            FrameError::TooBig { .. } => 1009,
        }
    }
}

/// What the next bytes of the client's stream hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A piece of a data message's payload (text or binary alike), unmasked; `end` is set on the
    /// last piece of the message (which may be empty).
    Data {
        /// The bytes.
        bytes: &'a [u8],
        /// Whether the message ends here.
        end: bool,
    },
    /// A ping with its payload (at most 125 bytes, and rare: owned).
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close frame: its code (none when the payload was empty) and reason.
    Close(Option<u16>, String),
}

/// The frame being read.
#[derive(Debug, Clone, Copy)]
struct Current {
    opcode: u8,
    fin: bool,
    /// Payload bytes still to come.
    remaining: u64,
    mask: [u8; 4],
    /// Where in the mask the next payload byte falls (payload offset mod 4).
    phase: usize,
}

/// The client's frames, parsed incrementally. See the module documentation.
#[derive(Debug)]
pub struct Decoder {
    max_message: u64,
    /// A header split across reads.
    head: [u8; 14],
    head_len: u8,
    frame: Option<Current>,
    /// The data message in progress (its first frame's opcode) and its size so far.
    message: Option<u8>,
    message_len: u64,
    utf8: Utf8,
    /// A control frame's payload split across reads.
    control: Vec<u8>,
}

impl Decoder {
    /// A decoder that refuses messages larger than `max_message` bytes.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message: max_message as u64,
            head: [0; 14],
            head_len: 0,
            frame: None,
            message: None,
            message_len: 0,
            utf8: Utf8::default(),
            control: Vec::new(),
        }
    }

    /// Parses from the start of `input`: returns how many bytes were used (at least one) and the
    /// event they completed, if any. Call again with the rest of the input until it is used up;
    /// what is left incomplete at its end is kept for the next read. Payload is unmasked in place.
    ///
    /// # Errors
    /// The client broke the protocol; the session must be closed with [`FrameError::code`].
    pub fn next<'a>(&mut self, input: &'a mut [u8]) -> Result<(usize, Option<Event<'a>>), FrameError> {
        let mut pos = 0;
        let frame = loop {
            if let Some(f) = self.frame {
                break f;
            }
            let Some(used) = self.header(&input[pos..])? else {
                return Ok((input.len(), None));
            };
            pos += used;
        };
        let available = usize::try_from(frame.remaining).unwrap_or(usize::MAX).min(input.len() - pos);
        let payload = &mut input[pos..pos + available];
        let phase = unmask(payload, frame.mask, frame.phase);
        let remaining = frame.remaining - available as u64;
        pos += available;
        let done = remaining == 0;
        self.frame = if done { None } else { Some(Current { remaining, phase, ..frame }) };

        if frame.opcode >= CLOSE {
            // A control frame: delivered whole.
            let body: &[u8] = if self.control.is_empty() && done {
                payload
            } else {
                self.control.extend_from_slice(payload);
                if !done {
                    return Ok((pos, None));
                }
                &self.control
            };
            let event = match frame.opcode {
                PING => Event::Ping(body.to_vec()),
                PONG => Event::Pong,
                _ => close_event(body)?,
            };
            return Ok((pos, Some(event)));
        }

        if self.message == Some(TEXT) {
            self.utf8.feed(payload)?;
        }
        let end = done && frame.fin;
        if end {
            if self.utf8.pending() {
                return Err(FrameError::Utf8);
            }
            self.message = None;
            self.message_len = 0;
        }
        if payload.is_empty() && !end {
            // An empty frame in the middle of a message: nothing to say.
            return Ok((pos, None));
        }
        Ok((pos, Some(Event::Data { bytes: payload, end })))
    }

    /// Reads a frame header from `input` (after any part kept from the last read) and starts the
    /// frame. Returns how many bytes of `input` it used, or `None` when the header is still
    /// incomplete (all of `input` was kept).
    fn header(&mut self, input: &[u8]) -> Result<Option<usize>, FrameError> {
        let kept = usize::from(self.head_len);
        let (parsed, used) = if kept == 0 {
            match parse_header(input) {
                Some((h, n)) => (h, n),
                None => {
                    self.head[..input.len()].copy_from_slice(input);
                    self.head_len = input.len() as u8;
                    return Ok(None);
                }
            }
        } else {
            let take = (14 - kept).min(input.len());
            self.head[kept..kept + take].copy_from_slice(&input[..take]);
            match parse_header(&self.head[..kept + take]) {
                Some((h, n)) => {
                    self.head_len = 0;
                    (h, n - kept)
                }
                None => {
                    self.head_len = (kept + take) as u8;
                    return Ok(None);
                }
            }
        };
        self.start(parsed)?;
        Ok(Some(used))
    }

    /// Checks a header against the protocol and the state of the message in progress.
    fn start(&mut self, h: Header) -> Result<(), FrameError> {
        if h.rsv != 0 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        if h.len >> 63 != 0 {
            return Err(FrameError::Protocol("frame length with the top bit set"));
        }
        let Some(mask) = h.mask else {
            return Err(FrameError::Protocol("unmasked frame from the client"));
        };
        match h.opcode {
            CLOSE | PING | PONG => {
                if !h.fin {
                    return Err(FrameError::Protocol("fragmented control frame"));
                }
                if h.len > MAX_CONTROL as u64 {
                    return Err(FrameError::Protocol("control frame too big"));
                }
                self.control.clear();
            }
            TEXT | BINARY | CONTINUATION => {
                match (h.opcode, self.message) {
                    (CONTINUATION, None) => return Err(FrameError::Protocol("continuation frame without a message")),
                    (TEXT | BINARY, Some(_)) => return Err(FrameError::Protocol("new message inside a fragmented one")),
                    (_, Some(_)) => {}
                    (op, None) => {
                        self.message = Some(op);
                        self.message_len = 0;
                    }
                }
                self.message_len = self.message_len.saturating_add(h.len);
                if self.message_len > self.max_message {
                    return Err(FrameError::TooBig {
                        size: self.message_len,
                        max: self.max_message,
                    });
                }
            }
            _ => return Err(FrameError::Protocol("unknown opcode")),
        }
        // `-vv`: every frame, never its payload. Disabled, this is one load and compare.
        tracing::trace!(
            dir = "client->bridge",
            opcode = opcode_name(h.opcode),
            fin = h.fin,
            len = h.len,
            "frame"
        );
        self.frame = Some(Current {
            opcode: h.opcode,
            fin: h.fin,
            remaining: h.len,
            mask,
            phase: 0,
        });
        Ok(())
    }
}

/// A parsed frame header.
#[derive(Debug)]
struct Header {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
}

/// Parses a header from the start of `b`: the header and its length, or `None` if `b` is too short.
fn parse_header(b: &[u8]) -> Option<(Header, usize)> {
    let (&first, &second) = (b.first()?, b.get(1)?);
    let (len, mut at) = match second & 0x7F {
        126 => (u64::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if second & 0x80 != 0 {
        let m: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let header = Header {
        fin: first & 0x80 != 0,
        rsv: first & 0x70,
        opcode: first & 0x0F,
        mask,
        len,
    };
    Some((header, at))
}

/// The event for a whole close frame payload.
fn close_event(body: &[u8]) -> Result<Event<'static>, FrameError> {
    match body {
        [] => Ok(Event::Close(None, String::new())),
        [_] => Err(FrameError::Protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            // The codes an endpoint may send (RFC 6455 §7.4 and the IANA registry: 1012-1014
            // are registered; 1004-1006 and 1015 must never appear in a frame).
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(FrameError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::ReasonUtf8)?;
            Ok(Event::Close(Some(code), reason.to_owned()))
        }
    }
}

/// Unmasks (or masks) `buf` whose first byte is at `phase` in the mask; returns the phase after it.
pub fn unmask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(phase + i) & 3]);
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= m[i & 3];
    }
    (phase + buf.len()) & 3
}

/// The header of one of our (unmasked, final) frames.
#[derive(Debug, Clone, Copy)]
pub struct OutHeader {
    bytes: [u8; 10],
    len: u8,
}

impl OutHeader {
    /// The header for a final frame of `opcode` carrying `len` payload bytes.
    pub fn new(opcode: u8, len: usize) -> OutHeader {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x80 | opcode;
        let n = match len {
            0..=125 => {
                bytes[1] = len as u8;
                2
            }
            126..=0xFFFF => {
                bytes[1] = 126;
                bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            _ => {
                bytes[1] = 127;
                bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        OutHeader { bytes, len: n }
    }

    /// The header's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Close reasons are limited to 123 bytes (RFC 6455 §5.5: 125 with the code).
pub const MAX_REASON: usize = 123;

/// A close reason cut to fit a close frame, at a character boundary.
pub fn truncate(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// A close frame's payload: the code (none for an empty payload) and a reason cut to fit.
pub fn close_payload(code: Option<u16>, reason: &str) -> Vec<u8> {
    let Some(code) = code else { return Vec::new() };
    let reason = truncate(reason);
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Incremental UTF-8 validation across the pieces of a text message.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8 {
    /// An unfinished sequence at the end of the last piece.
    carry: [u8; 4],
    len: u8,
}

impl Utf8 {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        // First finish the sequence left over from the last piece, a byte at a time.
        while self.len > 0 {
            let Some((&b, rest)) = data.split_first() else {
                return Ok(());
            };
            self.carry[usize::from(self.len)] = b;
            self.len += 1;
            data = rest;
            match std::str::from_utf8(&self.carry[..usize::from(self.len)]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() || self.len == 4 => return Err(FrameError::Utf8),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(FrameError::Utf8),
            Err(e) => {
                let tail = &data[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                Ok(())
            }
        }
    }

    fn pending(&self) -> bool {
        self.len > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![first];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask, 0);
        f.extend_from_slice(&p);
        f
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Data(Vec<u8>, bool),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>, String),
    }

    /// Feeds `stream` in pieces of `step` bytes; collects events (data pieces merged per message).
    fn decode(stream: &[u8], step: usize, max: usize) -> Result<Vec<Owned>, FrameError> {
        let mut d = Decoder::new(max);
        let mut out: Vec<Owned> = Vec::new();
        let mut open: Option<Vec<u8>> = None;
        for piece in stream.chunks(step) {
            let mut buf = piece.to_vec();
            let mut pos = 0;
            while pos < buf.len() {
                let (n, ev) = d.next(&mut buf[pos..])?;
                pos += n;
                match ev {
                    None => {}
                    Some(Event::Data { bytes, end }) => {
                        open.get_or_insert_with(Vec::new).extend_from_slice(bytes);
                        if end {
                            out.push(Owned::Data(open.take().unwrap(), true));
                        }
                    }
                    Some(Event::Ping(p)) => out.push(Owned::Ping(p)),
                    Some(Event::Pong) => out.push(Owned::Pong),
                    Some(Event::Close(c, r)) => out.push(Owned::Close(c, r)),
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn frames_decode_the_same_whatever_the_read_sizes() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let mut stream = Vec::new();
        stream.extend(client_frame(0x82, b"hello"));
        stream.extend(client_frame(0x02, &big[..300])); // fragmented binary
        stream.extend(client_frame(0x89, b"in between")); // ping between fragments
        stream.extend(client_frame(0x00, &big[300..]));
        stream.extend(client_frame(0x80, b""));
        stream.extend(client_frame(0x01, "hé".as_bytes()));
        stream.extend(client_frame(0x80, "llo €".as_bytes()));
        stream.extend(client_frame(0x8A, b""));
        stream.extend(client_frame(0x88, b"\x03\xf6bye")); // 1014, which wsbridge itself sends
        let want = vec![
            Owned::Data(b"hello".to_vec(), true),
            Owned::Ping(b"in between".to_vec()),
            Owned::Data(big.clone(), true),
            Owned::Data("héllo €".as_bytes().to_vec(), true),
            Owned::Pong,
            Owned::Close(Some(1014), "bye".into()),
        ];
        for step in [1, 2, 3, 7, 13, 100, 4096, stream.len()] {
            assert_eq!(decode(&stream, step, 1 << 20).unwrap(), want, "step {step}");
        }
    }

    #[test]
    fn violations_are_refused_with_their_codes() {
        let unmasked = vec![0x82, 0x01, b'x'];
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (unmasked, 1002),
            (client_frame(0xC2, b"x"), 1002),        // RSV1
            (client_frame(0x83, b"x"), 1002),        // reserved opcode
            (client_frame(0x09, b"x"), 1002),        // fragmented ping
            (client_frame(0x89, &[0u8; 126]), 1002), // oversized control frame
            (client_frame(0x80, b"x"), 1002),        // continuation without a message
            ([client_frame(0x02, b"a"), client_frame(0x82, b"b")].concat(), 1002),
            (client_frame(0x88, b"\x03"), 1002),     // one-byte close payload
            (client_frame(0x88, b"\x03\xed"), 1002), // close code 1005
            (client_frame(0x88, b"\x03\xf7"), 1002), // close code 1015
            ([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4].to_vec(), 1002), // length top bit
            (client_frame(0x88, b"\x03\xe8\xff"), 1007), // close reason not UTF-8
            (client_frame(0x81, b"ok \xff"), 1007),
            (client_frame(0x81, b"cut \xe2\x82"), 1007), // message ends inside a code point
            (client_frame(0x82, &[0u8; 11]), 1009),
            ([client_frame(0x02, &[0u8; 6]), client_frame(0x80, &[0u8; 6])].concat(), 1009),
        ];
        for (i, (stream, code)) in cases.iter().enumerate() {
            for step in [1, stream.len()] {
                let err = decode(stream, step, 10).expect_err(&format!("case {i}"));
                assert_eq!(err.code(), *code, "case {i}: {err}");
            }
        }
    }

    #[test]
    fn utf8_split_anywhere_is_accepted() {
        let text = "aé€𝄞z".repeat(5);
        let b = text.as_bytes();
        for cut in 0..b.len() {
            let stream = [client_frame(0x01, &b[..cut]), client_frame(0x80, &b[cut..])].concat();
            assert_eq!(decode(&stream, 5, 1000).unwrap(), vec![Owned::Data(b.to_vec(), true)], "cut {cut}");
        }
    }

    /// Random streams (valid frames of every kind mixed with garbage) decode to the same events
    /// or the same error whatever the read sizes, and never panic.
    #[test]
    fn random_streams_decode_alike_at_any_split() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..1000 {
            let mut stream = Vec::new();
            for _ in 0..rand(6) + 1 {
                match rand(10) {
                    0 => stream.extend((0..rand(20)).map(|_| rand(256) as u8)),
                    _ => {
                        let first = [0x81, 0x82, 0x01, 0x02, 0x00, 0x80, 0x89, 0x8A, 0x88][rand(9) as usize];
                        let len = [0, 1, 2, 5, 125, 126, 300, 70_000][rand(8) as usize];
                        let payload: Vec<u8> = (0..len)
                            .map(|_| if rand(4) == 0 { rand(256) as u8 } else { b'a' + rand(26) as u8 })
                            .collect();
                        stream.extend(client_frame(first, &payload));
                    }
                }
            }
            let max = [10, 1000, 1 << 20][rand(3) as usize];
            let whole = decode(&stream, stream.len().max(1), max);
            let step = rand(200) as usize + 1;
            let split = decode(&stream, step, max);
            match (&whole, &split) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "step {step}"),
                (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "step {step}"),
                _ => panic!("step {step}: {whole:?} vs {split:?}"),
            }
        }
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let t = truncate(&long);
        assert!(t.len() <= MAX_REASON && long.starts_with(t) && t.len() >= MAX_REASON - 1);
        assert_eq!(close_payload(Some(1011), &long).len(), 2 + t.len());
        assert_eq!(truncate("short"), "short");
    }

    #[test]
    fn headers_encode_every_length_form() {
        assert_eq!(OutHeader::new(BINARY, 5).as_bytes(), &[0x82, 5]);
        assert_eq!(OutHeader::new(TEXT, 300).as_bytes(), &[0x81, 126, 1, 44]);
        assert_eq!(
            OutHeader::new(BINARY, 70_000).as_bytes(),
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
        let mut data = *b"0123456789abc";
        let phase = unmask(&mut data[..5], [1, 2, 3, 4], 0);
        unmask(&mut data[5..], [1, 2, 3, 4], phase);
        unmask(&mut data, [1, 2, 3, 4], 0);
        assert_eq!(&data, b"0123456789abc");
    }
}
