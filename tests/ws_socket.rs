//! The WebSocket layer over a real socket: a glommio server built from `zcache::ws` against the
//! `tungstenite` client (and a raw client for what tungstenite cannot do).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::Timer;
use glommio::LocalExecutorBuilder;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame as TFrame;
use tungstenite::Message as TMessage;
use zcache::ws::{
    parse_request, response_101, response_http, validate_upgrade, Message, WsError, WsLimits,
    WsReader, WsWriter,
};

const HEAD_BYTES_MAX: usize = 64 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
const LINGER: Duration = Duration::from_secs(2);
/// What Zero puts in Sec-WebSocket-Protocol: encodeURIComponent(base64(JSON)).
const ZERO_PROTOCOL: &str = "eyJhdXRoVG9rZW4iOiJhYmMiLCJpbml0Q29ubmVjdGlvbk1lc3NhZ2UiOltdfQ%3D%3D";

/// Starts a one-connection server; the handle yields what the server saw, one line per event.
fn spawn_server(limits: WsLimits) -> (SocketAddr, JoinHandle<Vec<String>>) {
    let (addr_tx, addr_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let executor = LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .make()
            .expect("glommio executor");
        executor.run(async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            addr_tx
                .send(listener.local_addr().expect("addr"))
                .expect("send addr");
            let stream = listener.accept().await.expect("accept");
            let mut log = Vec::new();
            serve(stream, limits, &mut log).await;
            log
        })
    });
    let addr = addr_rx
        .recv_timeout(CLIENT_TIMEOUT)
        .expect("server address");
    (addr, handle)
}

async fn serve(mut stream: TcpStream, limits: WsLimits, log: &mut Vec<String>) {
    let mut buf = BytesMut::new();
    let (req, used) = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read head");
        if n == 0 {
            log.push("eof before head".into());
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_request(&buf, HEAD_BYTES_MAX) {
            Ok(Some(done)) => break done,
            Ok(None) => continue,
            Err(e) => {
                stream.write_all(&e.response()).await.expect("write error");
                log.push(format!("bad head: {e}"));
                return;
            }
        }
    };
    let leftover = buf.split_off(used);
    log.push(format!(
        "path {} clientID {:?}",
        req.path,
        req.query_param("clientID")
    ));
    if !req.is_websocket_upgrade() {
        let resp = response_http(200, "OK", "text/plain", b"OK");
        stream.write_all(&resp).await.expect("write health");
        log.push("health".into());
        return;
    }
    let accept = match validate_upgrade(&req) {
        Ok(accept) => accept,
        Err(e) => {
            stream.write_all(&e.response()).await.expect("write error");
            log.push(format!("rejected: {e}"));
            return;
        }
    };
    stream
        .write_all(&response_101(&accept, req.protocol()))
        .await
        .expect("write 101");
    let (r, w) = futures_lite::io::split(stream);
    let mut reader = WsReader::new(r, leftover, limits);
    let mut writer = WsWriter::new(w);
    echo(&mut reader, &mut writer, log).await;
    // Lingering close: dropping a socket with unread input makes the kernel send RST, which
    // can destroy the close frame before the client reads it.
    let _ = writer.into_inner().close().await;
    let (mut r, _) = reader.into_inner();
    let drain = async {
        let mut sink = [0u8; 16 * 1024];
        while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let linger = async {
        Timer::new(LINGER).await;
    };
    futures_lite::future::or(drain, linger).await;
}

async fn echo<R, W>(reader: &mut WsReader<R>, writer: &mut WsWriter<W>, log: &mut Vec<String>)
where
    R: futures_lite::io::AsyncRead + Unpin,
    W: futures_lite::io::AsyncWrite + Unpin,
{
    loop {
        let sent = match reader.next_message().await {
            Ok(Message::Text(text)) => {
                log.push(format!("text {}", text.len()));
                writer.send_text(&text).await
            }
            Ok(Message::Binary(data)) => {
                log.push(format!("binary {}", data.len()));
                writer.send_binary(&data).await
            }
            Ok(Message::Ping(payload)) => {
                log.push(format!("ping {}", String::from_utf8_lossy(&payload)));
                writer.send_pong(&payload).await
            }
            Ok(Message::Pong(_)) => Ok(()),
            Ok(Message::Close { code, reason }) => {
                log.push(format!("close {code:?} {reason}"));
                let _ = writer.close(code.unwrap_or(1000), "").await;
                return;
            }
            Err(WsError::Closed) => {
                log.push("eof".into());
                return;
            }
            Err(e) => {
                log.push(format!("error {:?} {e}", e.close_code()));
                if let Some(code) = e.close_code() {
                    let _ = writer.close(code, "").await;
                }
                return;
            }
        };
        sent.expect("server send");
    }
}

type Client = tungstenite::WebSocket<StdTcpStream>;

fn connect(
    addr: SocketAddr,
    protocol: Option<&str>,
) -> (Client, tungstenite::handshake::client::Response) {
    let stream = StdTcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let url = format!("ws://{addr}/sync/v51/connect?clientID=c%201&clientGroupID=g&ts=1&lmid=0");
    let mut request = url.into_client_request().unwrap();
    if let Some(protocol) = protocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(protocol).unwrap(),
        );
    }
    tungstenite::client(request, stream).expect("handshake")
}

/// Reads until a non-control message, which it returns.
fn read_data(ws: &mut Client) -> TMessage {
    loop {
        match ws.read().expect("client read") {
            TMessage::Ping(_) | TMessage::Pong(_) => continue,
            other => return other,
        }
    }
}

fn close_handshake(ws: &mut Client) {
    ws.close(None).expect("send close");
    loop {
        match ws.read() {
            Ok(TMessage::Close(_)) | Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake: {e}"),
        }
    }
}

#[test]
fn echoes_protocol_text_fragments_ping_and_close() {
    let (addr, server) = spawn_server(WsLimits::default());
    let (mut ws, response) = connect(addr, Some(ZERO_PROTOCOL));
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        ZERO_PROTOCOL
    );

    ws.send(TMessage::text(r#"["ping",{}]"#)).unwrap();
    assert_eq!(read_data(&mut ws), TMessage::text(r#"["ping",{}]"#));

    // A 3 MiB text message in 64 KiB fragments with a ping in the middle.
    let big: String = (0..3 * 1024 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let chunks: Vec<&[u8]> = big.as_bytes().chunks(64 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let last = i + 1 == chunks.len();
        ws.send(TMessage::Frame(TFrame::message(
            chunk.to_vec(),
            opcode,
            last,
        )))
        .unwrap();
        if i == chunks.len() / 2 {
            ws.send(TMessage::Ping("mid".into())).unwrap();
        }
    }
    match ws.read().expect("pong") {
        TMessage::Pong(payload) => assert_eq!(&payload[..], b"mid"),
        other => panic!("expected pong, got {other:?}"),
    }
    match read_data(&mut ws) {
        TMessage::Text(text) => assert!(text.as_str() == big),
        other => panic!("expected text, got {other:?}"),
    }

    ws.send(TMessage::Binary(vec![0u8, 1, 2, 255].into()))
        .unwrap();
    assert_eq!(
        read_data(&mut ws),
        TMessage::Binary(vec![0u8, 1, 2, 255].into())
    );

    close_handshake(&mut ws);
    let log = server.join().unwrap();
    assert_eq!(log[0], r#"path /sync/v51/connect clientID Some("c 1")"#);
    assert!(log.contains(&format!("text {}", big.len())), "{log:?}");
    assert!(log.contains(&"ping mid".to_string()), "{log:?}");
    assert_eq!(log.last().unwrap(), "close None ");
}

#[test]
fn handshake_without_protocol_has_none() {
    let (addr, server) = spawn_server(WsLimits::default());
    let (mut ws, response) = connect(addr, None);
    assert!(response.headers().get("sec-websocket-protocol").is_none());
    ws.send(TMessage::text("x")).unwrap();
    assert_eq!(read_data(&mut ws), TMessage::text("x"));
    close_handshake(&mut ws);
    server.join().unwrap();
}

#[test]
fn oversized_message_gets_close_1009() {
    let limits = WsLimits {
        frame_bytes_max: 64 * 1024,
        message_bytes_max: 64 * 1024,
    };
    let (addr, server) = spawn_server(limits);
    let (mut ws, _) = connect(addr, Some(ZERO_PROTOCOL));
    ws.send(TMessage::Binary(vec![7u8; 64 * 1024].into()))
        .unwrap();
    assert_eq!(
        read_data(&mut ws),
        TMessage::Binary(vec![7u8; 64 * 1024].into())
    );
    ws.send(TMessage::Binary(vec![7u8; 64 * 1024 + 1].into()))
        .unwrap();
    match read_data(&mut ws) {
        TMessage::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected close 1009, got {other:?}"),
    }
    drop(ws); // lets the server's lingering drain see EOF
    let log = server.join().unwrap();
    assert!(
        log.last().unwrap().starts_with("error Some(1009)"),
        "{log:?}"
    );
}

fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = StdTcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    response
}

#[test]
fn plain_http_gets_a_complete_response() {
    let (addr, server) = spawn_server(WsLimits::default());
    let response = raw_exchange(addr, b"GET /keepalive HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        response,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK"
    );
    assert_eq!(server.join().unwrap().last().unwrap(), "health");
}

#[test]
fn wrong_version_gets_426() {
    let (addr, server) = spawn_server(WsLimits::default());
    let response = raw_exchange(
        addr,
        b"GET /sync/v51/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    let text = String::from_utf8(response).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
    server.join().unwrap();
}

#[test]
fn frame_pipelined_with_the_head_is_not_lost() {
    let (addr, server) = spawn_server(WsLimits::default());
    let mut stream = StdTcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let mut request = b"GET /sync/v51/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: p1\r\n\r\n"
        .to_vec();
    // RFC 6455 §5.7's masked "Hello", then a masked empty close, in the same write.
    request.extend_from_slice(&[
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ]);
    request.extend_from_slice(&[0x88, 0x80, 1, 2, 3, 4]);
    stream.write_all(&request).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let expected_head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
        Sec-WebSocket-Protocol: p1\r\n\r\n";
    let (head, frames) = response.split_at(expected_head.len());
    assert_eq!(std::str::from_utf8(head).unwrap(), expected_head);
    assert_eq!(
        frames,
        &[0x81, 5, b'H', b'e', b'l', b'l', b'o', 0x88, 2, 0x03, 0xE8]
    );
    let log = server.join().unwrap();
    assert_eq!(log[1..], ["text 5".to_string(), "close None ".to_string()]);
}
