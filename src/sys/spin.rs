//! Waiting for a socket to become readable by spinning briefly before blocking: on a busy
//! connection the next message comes within microseconds, and a thread that sleeps in
//! `read` pays a wake-up (tens of microseconds on a virtual machine) for every one of
//! them. After the spin the caller blocks as usual, so an idle connection costs no CPU.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Whether a read of `socket` would not block now: data waits, the peer closed, or the
/// socket has an error (the read reports it). Peeks with `MSG_DONTWAIT`, leaving the
/// socket's own blocking mode alone (other threads may be writing through a clone).
pub fn readable_now(socket: &impl AsRawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: one writable byte; MSG_PEEK consumes nothing; the fd is borrowed live.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return true;
    }
    let e = io::Error::last_os_error();
    !matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Spins up to `spin` for `socket` to become [readable](readable_now); returns whether it
/// did.
pub fn spin_until_readable(socket: &impl AsRawFd, spin: Duration) -> bool {
    let start = Instant::now();
    loop {
        if readable_now(socket) {
            return true;
        }
        if start.elapsed() >= spin {
            return false;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn readable_only_once_data_or_eof_arrives() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!readable_now(&server));
        assert!(!spin_until_readable(&server, Duration::from_micros(200)));
        client.write_all(b"x").unwrap();
        assert!(spin_until_readable(&server, Duration::from_secs(5)));
        // Peeking consumed nothing.
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut &server, &mut b).unwrap();
        assert_eq!(&b, b"x");
        assert!(!readable_now(&server));
        drop(client);
        assert!(
            spin_until_readable(&server, Duration::from_secs(5)),
            "EOF is readable"
        );
    }
}
