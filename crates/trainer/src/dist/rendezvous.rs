//! The TCP rendezvous that hands rank 0's NCCL unique id (128 bytes) to the other ranks.
//!
//! Rank 0 listens on MASTER_ADDR:MASTER_PORT and accepts one connection per other rank; each peer
//! connects (retrying until rank 0 listens), sends `MAGIC`, its rank and the world size it was started
//! with, and reads back the id. Rank 0 checks that every rank 1..N arrives exactly once with the same
//! world size, and both sides give up at a deadline with an error naming the address and what is
//! missing. Plain `std::net`; the id is not secret in NCCL's threat model (it names rank 0's NCCL
//! bootstrap socket), so the rendezvous is meant for a trusted cluster network, as torchrun's is.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{DistError, Result};

/// Sent first by every peer, so a stray connection to the port is recognized and refused.
const MAGIC: &[u8; 8] = b"afinar01";

fn err(addr: &str, message: impl Into<String>) -> DistError {
    DistError::Rendezvous {
        addr: addr.to_string(),
        message: message.into(),
    }
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let v: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err(addr, format!("cannot resolve: {e}")))?
        .collect();
    if v.is_empty() {
        return Err(err(addr, "resolves to no address"));
    }
    Ok(v)
}

/// Rank 0: serves `payload` to ranks 1..world_size at `addr`, then returns. Binds the port before
/// anything else, so a port in use is reported at once.
pub fn serve(addr: &str, world_size: usize, payload: &[u8], timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(&resolve(addr)?[..])
        .map_err(|e| err(addr, format!("rank 0 cannot listen: {e}")))?;
    serve_on(listener, addr, world_size, payload, timeout)
}

/// [`serve`] on a listener the caller bound (tests bind port 0 and read the port back).
pub fn serve_on(
    listener: TcpListener,
    addr: &str,
    world_size: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(addr, e.to_string()))?;
    let mut seen = vec![false; world_size];
    seen[0] = true;
    while seen.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)
                    .and_then(|_| s.set_read_timeout(Some(Duration::from_secs(10))))
                    .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(10))))
                    .map_err(|e| err(addr, e.to_string()))?;
                let mut hello = [0u8; 24];
                if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    // Not one of ours (a port scanner, a health check): ignore it.
                    continue;
                }
                let rank = u64::from_le_bytes(hello[8..16].try_into().unwrap()) as usize;
                let ws = u64::from_le_bytes(hello[16..24].try_into().unwrap()) as usize;
                if ws != world_size {
                    return Err(err(
                        addr,
                        format!("rank {rank} (from {peer}) was started with WORLD_SIZE={ws}, rank 0 with {world_size}"),
                    ));
                }
                if rank == 0 || rank >= world_size || seen[rank] {
                    return Err(err(
                        addr,
                        format!("a second rank {rank} (from {peer}) joined; every rank needs its own RANK"),
                    ));
                }
                let len = (payload.len() as u64).to_le_bytes();
                s.write_all(&len)
                    .and_then(|_| s.write_all(payload))
                    .map_err(|e| {
                        err(addr, format!("sending the id to rank {rank} ({peer}): {e}"))
                    })?;
                seen[rank] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (0..world_size)
                        .filter(|&r| !seen[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(err(
                        addr,
                        format!(
                            "rank 0 waited {:.0} s; ranks {} never connected (are they started, with the same MASTER_ADDR and MASTER_PORT?)",
                            timeout.as_secs_f64(),
                            missing.join(", ")
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err(addr, format!("accept: {e}"))),
        }
    }
    Ok(())
}

/// Ranks 1..N: connects to rank 0 at `addr` (retrying until the deadline, since rank 0 may start
/// later) and returns its payload.
pub fn fetch(addr: &str, rank: usize, world_size: usize, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let targets = resolve(addr)?;
    let mut last_err = String::from("no attempt");
    let mut s = loop {
        match targets
            .iter()
            .find_map(|t| TcpStream::connect_timeout(t, Duration::from_secs(2)).map_err(|e| last_err = e.to_string()).ok())
        {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                return Err(err(
                    addr,
                    format!(
                        "rank {rank} could not reach rank 0 in {:.0} s (last error: {last_err}); is rank 0 running and MASTER_ADDR reachable from this node?",
                        timeout.as_secs_f64()
                    ),
                ))
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    s.set_read_timeout(Some(left))
        .and_then(|_| s.set_write_timeout(Some(left)))
        .map_err(|e| err(addr, e.to_string()))?;
    let mut hello = Vec::with_capacity(24);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u64).to_le_bytes());
    hello.extend_from_slice(&(world_size as u64).to_le_bytes());
    s.write_all(&hello)
        .map_err(|e| err(addr, format!("rank {rank}: sending hello: {e}")))?;
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(|e| {
        err(
            addr,
            format!(
                "rank {rank}: rank 0 closed the connection without an id ({e}); see rank 0's error"
            ),
        )
    })?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 20 {
        return Err(err(
            addr,
            format!("rank {rank}: rank 0 announced a {len}-byte id"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .map_err(|e| err(addr, format!("rank {rank}: reading the id: {e}")))?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_zero_hands_a_128_byte_id_to_every_rank_over_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let id: Vec<u8> = (0..128u32).map(|i| (i * 7 + 3) as u8).collect();
        let peers: Vec<_> = (1..4)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || fetch(&addr, r, 4, Duration::from_secs(20)))
            })
            .collect();
        serve_on(listener, &addr, 4, &id, Duration::from_secs(20)).unwrap();
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn missing_ranks_and_wrong_world_sizes_are_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let e = serve_on(listener, &addr, 3, &[1; 128], Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks 1, 2 never connected"), "{e}");

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let a2 = addr.clone();
        let peer = std::thread::spawn(move || fetch(&a2, 1, 3, Duration::from_secs(20)));
        let e = serve_on(listener, &addr, 2, &[1; 128], Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE=3, rank 0 with 2"), "{e}");
        assert!(peer.join().unwrap().is_err());
    }

    #[test]
    fn a_peer_without_rank_zero_times_out_with_a_clear_error() {
        // Bind then drop: nothing listens on this port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = fetch(
            &format!("127.0.0.1:{port}"),
            1,
            2,
            Duration::from_millis(200),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("could not reach rank 0"), "{e}");
    }
}
