//! TCP backends the bridges forward to.

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Kind {
    /// Write back everything that is read
    Echo,
    /// Read and discard
    Sink,
    /// Write a fixed pattern as fast as the peer reads
    Source,
}

/// Bind, print the bound port as the first stdout line, then serve forever.
pub async fn run(kind: Kind, listen: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?.port());
    serve_forever(kind, listener).await
}

pub async fn serve_forever(kind: Kind, listener: TcpListener) -> Result<()> {
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: keep serving the connections we have.
                eprintln!("backend accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        tokio::spawn(async move {
            let _ = serve(kind, sock).await;
        });
    }
}

async fn serve(kind: Kind, mut sock: TcpStream) -> std::io::Result<()> {
    match kind {
        Kind::Echo => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = sock.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                sock.write_all(&buf[..n]).await?;
            }
        }
        Kind::Sink => {
            let mut buf = vec![0u8; 256 * 1024];
            while sock.read(&mut buf).await? > 0 {}
            Ok(())
        }
        Kind::Source => {
            let buf: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
            loop {
                sock.write_all(&buf).await?;
            }
        }
    }
}
