//! mixapp: the app behind the relay for the mixed-traffic test. Thread per connection, std only.
//!   mixapp BULK_KIND TRIGGER_FILE      (BULK_KIND: sink | source | sink-paced | source-paced)
//! Prints its port. Every accepted connection echoes, except that when TRIGGER_FILE exists at
//! accept time the file is removed and that connection is the bulk one (sink: read and discard;
//! source: write a 64 KiB pattern as fast as the peer reads). Prints "bulk" when it accepts it.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind = args[1].clone();
    let trigger = args[2].clone();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", l.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let _ = s.set_nodelay(true);
        let bulk = std::fs::remove_file(&trigger).is_ok();
        if !bulk {
            thread::spawn(move || echo(s));
            continue;
        }
        println!("bulk");
        std::io::stdout().flush().unwrap();
        let kind = kind.clone();
        thread::spawn(move || {
            // paced kinds: 1 MiB per 10 ms (~105 MB/s), so the bulk session does not saturate the CPUs
            let tick = std::time::Duration::from_millis(10);
            if kind == "sink-paced" {
                let mut buf = vec![0u8; 1 << 20];
                let mut next = std::time::Instant::now();
                loop {
                    let mut got = 0;
                    while got < buf.len() {
                        match s.read(&mut buf[got..]) { Ok(n) if n > 0 => got += n, _ => return }
                    }
                    next += tick;
                    if let Some(d) = next.checked_duration_since(std::time::Instant::now()) { thread::sleep(d) }
                }
            } else if kind == "source-paced" {
                let buf = vec![0x5au8; 1 << 20];
                let mut next = std::time::Instant::now();
                while s.write_all(&buf).is_ok() {
                    next += tick;
                    if let Some(d) = next.checked_duration_since(std::time::Instant::now()) { thread::sleep(d) }
                }
            } else if kind == "sink" {
                let mut buf = vec![0u8; 262144];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            } else {
                let buf = vec![0x5au8; 65536];
                while s.write_all(&buf).is_ok() {}
            }
        });
    }
}
