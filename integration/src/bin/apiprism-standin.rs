//! A stand-in Kubernetes API server for apiprism's tests, benchmark and lab (see `hybridnet_integration::
//! apiprism`): TLS + HTTP/2, `GET /name` and a streaming `GET /watch`.
//!
//!     apiprism-standin NAME LISTEN_ADDR PKI_DIR
//!
//! `PKI_DIR` holds `ca.der`, `server.der` and `server.key.der` (written by `Pki::write`, or with `--gen-pki`
//! instead of NAME: `apiprism-standin --gen-pki PKI_DIR`). Prints `listening <addr>` once bound.
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use hybridnet_integration::apiprism::{Pki, serve};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--gen-pki" => {
            std::fs::create_dir_all(dir).ok();
            Pki::generate().write(Path::new(dir));
            ExitCode::SUCCESS
        }
        [name, listen, dir] => match run(name, listen, dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apiprism-standin: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: apiprism-standin NAME LISTEN_ADDR PKI_DIR | --gen-pki PKI_DIR");
            ExitCode::from(2)
        }
    }
}

fn run(name: &str, listen: &str, dir: &str) -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = listen.parse()?;
    let tls = Pki::read(Path::new(dir))?.server_config()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        #[allow(clippy::print_stdout)] // the readiness line the caller waits for
        {
            println!("listening {}", listener.local_addr()?);
        }
        serve(name.to_owned(), listener, tls).await;
        Ok(())
    })
}
