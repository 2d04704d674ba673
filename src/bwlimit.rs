//! Bandwidth limit (`--bwlimit`, config `bwlimit`): rsync's rate syntax
//! and a token-bucket writer that paces the bytes a side sends.
//!
//! The source paces its own writer and passes the limit to the target in
//! the handshake, so the target paces what it sends too (a `verify`'s
//! digests included).

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Parses a rate in rsync's units: a bare number is KiB/s; `K`, `M`, `G`
/// (or `KiB`, `MiB`, `GiB`) are powers of 1024, `KB`, `MB`, `GB` powers
/// of 1000; a `B` suffix means bytes. Fractions are allowed ("1.5M").
/// Returns bytes per second; 0 means no limit.
/// The lowest rate a limit may have (bytes per second): below it one
/// frame's bucket would take longer than a session's silence is allowed.
pub const MIN_RATE: u64 = 512;

pub fn parse_rate(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "bad rate {text:?}: use a number of KiB/s, or a number with K, M or G (e.g. 500, 20M)"
        )
    };
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("/s").unwrap_or(&unit);
    let mult: f64 = match unit {
        "" | "k" | "kib" => 1024.0,
        "b" => 1.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        _ => return Err(bad()),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    let bytes = bytes.round() as u64;
    if bytes > 0 && bytes < MIN_RATE {
        return Err(format!("rate {text:?} is below {MIN_RATE} bytes/s"));
    }
    Ok(bytes)
}

/// A rate in bytes per second that can be set after the writer it paces
/// was made (the target learns it from the handshake); 0 = unlimited.
#[derive(Debug, Clone, Default)]
pub struct Rate(Arc<AtomicU64>);

impl Rate {
    pub fn new(bytes_per_second: u64) -> Self {
        Self(Arc::new(AtomicU64::new(bytes_per_second)))
    }

    pub fn set(&self, bytes_per_second: u64) {
        self.0.store(bytes_per_second, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A writer that sends at most `rate` bytes per second: a token bucket
/// holding at most 50 ms of tokens (at least 512 bytes), starting empty,
/// so over any stretch of time no more than `rate × time` bytes leave
/// plus one bucket.
#[derive(Debug)]
pub struct Limited<W> {
    inner: W,
    rate: Rate,
    tokens: f64,
    last: Instant,
}

impl<W> Limited<W> {
    pub fn new(inner: W, rate: Rate) -> Self {
        Self {
            inner,
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, rate: f64, bucket: f64) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(bucket);
        self.last = now;
    }
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let rate = self.rate.get();
        if rate == 0 || buf.is_empty() {
            self.last = Instant::now();
            return self.inner.write(buf);
        }
        let rate = rate as f64;
        let bucket = (rate / 20.0).max(512.0);
        let n = buf.len().min(bucket as usize);
        self.refill(rate, bucket);
        if self.tokens < n as f64 {
            std::thread::sleep(Duration::from_secs_f64((n as f64 - self.tokens) / rate));
            self.refill(rate, bucket);
        }
        // Sleep granularity may leave a sliver short; the debt is paid by
        // the next write.
        self.tokens -= n as f64;
        let written = self.inner.write(&buf[..n])?;
        self.tokens += (n - written) as f64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_units() {
        assert_eq!(parse_rate("100"), Ok(100 * 1024));
        assert_eq!(parse_rate("100K"), Ok(100 * 1024));
        assert_eq!(parse_rate("1.5m"), Ok(1024 * 1024 * 3 / 2));
        assert_eq!(parse_rate("2G"), Ok(2 << 30));
        assert_eq!(parse_rate("2MB"), Ok(2_000_000));
        assert_eq!(parse_rate("20MiB/s"), Ok(20 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10X").is_err());
        assert!(parse_rate("").is_err());
        assert!(parse_rate("100b").is_err(), "below 512 B/s");
    }

    #[test]
    fn paces_writes() {
        let rate = 256 * 1024;
        let mut w = Limited::new(Vec::new(), Rate::new(rate));
        let started = Instant::now();
        w.write_all(&vec![7u8; 128 * 1024]).unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(w.inner.len(), 128 * 1024);
        assert!(secs >= 0.5 * 0.95, "{secs}s is too fast");
        assert!(secs < 1.0, "{secs}s is too slow");
    }

    #[test]
    fn unlimited_and_late_limits() {
        let rate = Rate::default();
        let mut w = Limited::new(Vec::new(), rate.clone());
        let started = Instant::now();
        w.write_all(&vec![0u8; 1 << 20]).unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
        rate.set(64 * 1024);
        let started = Instant::now();
        w.write_all(&vec![0u8; 16 * 1024]).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(230));
    }
}
