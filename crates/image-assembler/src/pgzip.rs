//! Gzip in parallel, with output that depends on the input alone.
//!
//! The input is cut into fixed chunks ([`CHUNK_SIZE`]); each chunk is deflated on its own
//! (flate2's zlib-rs backend, raw deflate at the given level, no shared dictionary)
//! and ended with a sync flush so the next chunk starts on a byte boundary; the last one
//! ends the stream. This is how pigz cuts its input, and it makes the bytes independent of
//! how many threads compressed them: a chunk's output depends only on its own bytes, the
//! level and the chunk size. The gzip header is fixed (mtime 0, no name, OS 255) and the
//! trailer is the CRC-32 and length of the whole input, as in any gzip file.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::thread::JoinHandle;

use flate2::{Compress, Compression, FlushCompress, Status};

/// The input size of every chunk but the last. Changing it changes every digest.
pub const CHUNK_SIZE: usize = 1 << 20;
/// ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=255.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// A writer that gzips what it is given, compressing up to `threads` chunks at once.
pub struct ParallelGzip<W: Write> {
    inner: W,
    level: u32,
    threads: usize,
    chunk: Vec<u8>,
    in_flight: VecDeque<JoinHandle<io::Result<Vec<u8>>>>,
    crc: flate2::Crc,
    header_written: bool,
}

impl<W: Write> ParallelGzip<W> {
    pub fn new(inner: W, level: u32) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            inner,
            level,
            threads,
            chunk: Vec::with_capacity(CHUNK_SIZE),
            in_flight: VecDeque::new(),
            crc: flate2::Crc::new(),
            header_written: false,
        }
    }

    /// Compresses what is left, writes the trailer and gives back the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_header()?;
        let last = std::mem::take(&mut self.chunk);
        let compressed = deflate(&last, self.level, FlushCompress::Finish)?;
        self.drain(0)?;
        self.inner.write_all(&compressed)?;
        self.inner.write_all(&self.crc.sum().to_le_bytes())?;
        self.inner.write_all(&self.crc.amount().to_le_bytes())?;
        Ok(self.inner)
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.inner.write_all(&HEADER)?;
            self.header_written = true;
        }
        Ok(())
    }

    /// Hands the full chunk to a thread, after making room.
    fn dispatch(&mut self) -> io::Result<()> {
        self.write_header()?;
        self.drain(self.threads.saturating_sub(1))?;
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_SIZE));
        let level = self.level;
        self.in_flight
            .push_back(std::thread::spawn(move || deflate(&chunk, level, FlushCompress::Sync)));
        Ok(())
    }

    /// Writes finished chunks, in order, until at most `keep` are still in flight.
    fn drain(&mut self, keep: usize) -> io::Result<()> {
        while self.in_flight.len() > keep {
            let handle = self.in_flight.pop_front().expect("a chunk in flight");
            let compressed =
                handle.join().map_err(|_| io::Error::other("a compression thread panicked"))??;
            self.inner.write_all(&compressed)?;
        }
        Ok(())
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = CHUNK_SIZE - self.chunk.len();
        let taken = &buf[..buf.len().min(room)];
        self.chunk.extend_from_slice(taken);
        self.crc.update(taken);
        if self.chunk.len() == CHUNK_SIZE {
            self.dispatch()?;
        }
        Ok(taken.len())
    }

    /// Chunks are cut at fixed sizes only; a flush forces nothing out early.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raw deflate of one chunk, ended with `flush`.
fn deflate(input: &[u8], level: u32, flush: FlushCompress) -> io::Result<Vec<u8>> {
    let mut compress = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(input.len() / 2 + 1024);
    loop {
        let consumed = compress.total_in() as usize;
        let status =
            compress.compress_vec(&input[consumed..], &mut out, flush).map_err(io::Error::other)?;
        let all_in = compress.total_in() as usize == input.len();
        let done = match flush {
            FlushCompress::Finish => status == Status::StreamEnd,
            // A sync flush is complete when everything went in and the output had room left.
            _ => all_in && out.len() < out.capacity(),
        };
        if done {
            return Ok(out);
        }
        out.reserve(out.capacity().max(64 * 1024));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gzip(data: &[u8], threads: usize, piece: usize) -> Vec<u8> {
        let mut writer = ParallelGzip::new(Vec::new(), 6);
        writer.threads = threads;
        for part in data.chunks(piece) {
            writer.write_all(part).unwrap();
        }
        writer.finish().unwrap()
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 12345;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 3 == 0 {
                    b'a' + (i % 7) as u8
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn any_gzip_reader_gets_the_input_back() {
        for len in [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, 3 * CHUNK_SIZE + 17] {
            let data = sample(len);
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(gzip(&data, 2, 65536).as_slice())
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "length {len}");
        }
    }

    #[test]
    fn gnu_gzip_reads_it() {
        let Some(gzip_bin) = harness::tools::require("gzip", "apt-get install gzip") else {
            return;
        };
        let data = sample(3 * CHUNK_SIZE + 5);
        let compressed = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(compressed.path(), gzip(&data, 2, 8192)).unwrap();
        let output = std::process::Command::new(gzip_bin)
            .arg("-dc")
            .arg(compressed.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.stdout, data);
    }

    #[test]
    fn the_bytes_do_not_depend_on_threads_or_write_sizes() {
        let data = sample(2 * CHUNK_SIZE + 1000);
        let one = gzip(&data, 1, 4096);
        assert_eq!(one, gzip(&data, 2, 1 << 20));
        assert_eq!(one, gzip(&data, 8, 333));
    }
}
