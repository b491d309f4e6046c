//! cordon as a PostgreSQL client: connect from outside every tagged cgroup,
//! TLS per policy, the startup message, and authentication.
//!
//! - `inject` (default): the workload's password is never asked for. cordon
//!   answers the server's challenge (SCRAM-SHA-256, md5 or cleartext) with
//!   the credential from the secrets file, and the client sees only
//!   AuthenticationOk. The secret never crosses to the workload.
//! - `passthrough`: challenges and answers are relayed. SCRAM channel binding
//!   cannot cross a proxy, so `-PLUS` mechanisms are not offered.

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    frame::{Body, Frame, FrameReader},
    scram,
    startup::ClientHello,
    wire, Ctx,
};
use crate::{
    config::{AuthMode, UpstreamTls},
    net::Stream,
    secrets::Credential,
};

pub struct Upstream {
    pub stream: Stream,
    pub reader: FrameReader,
    pub user: String,
}

pub async fn connect(ctx: &Ctx) -> Result<Stream> {
    let tcp = crate::proxy::connect_upstream(ctx.upstream, &ctx.shared).await?;
    let pg = ctx.rule.login.as_ref().ok_or_else(|| anyhow!("intercept {} has no login settings", ctx.rule.name))?;
    match &pg.tls {
        UpstreamTls::Disable => Ok(Stream::Plain(tcp)),
        UpstreamTls::VerifyFull { ca_file, server_name } => {
            let mut tcp = tcp;
            let mut req = BytesMut::new();
            bytes::BufMut::put_i32(&mut req, 8);
            bytes::BufMut::put_i32(&mut req, wire::SSL_REQUEST);
            tcp.write_all(&req).await.context("sending SSLRequest upstream")?;
            let answer = tcp.read_u8().await.context("reading the server's SSLRequest answer")?;
            if answer != b'S' {
                bail!(
                    "the server at {} refused TLS, which the policy requires (upstream_tls = \"verify-full\")",
                    ctx.upstream
                );
            }
            let name = server_name.clone().unwrap_or_else(|| ctx.upstream.ip().to_string());
            let config = ctx.shared.upstream_tls(ca_file.as_deref())?;
            let connector = tokio_rustls::TlsConnector::from(config);
            let tls = connector
                .connect(crate::net::server_name(&name)?, tcp)
                .await
                .with_context(|| format!("TLS with {} (verify-full as {name:?})", ctx.upstream))?;
            Ok(Stream::Client(Box::new(tls)))
        }
    }
}

/// The server's connection, opened while the client negotiates its
/// startup (TLS, SSLRequest, the startup message): PostgreSQL forks the
/// backend meanwhile, and a distant server's round trips (TCP, TLS) overlap
/// the client's. `progress` drives it inside a `select!` and is cancel-safe;
/// `finish` hands it over (or connects now, if it was never started).
pub struct Early<'a> {
    connecting: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<Stream>> + Send + 'a>>>,
    done: Option<(Result<Stream>, std::time::Instant)>,
}

/// An early connection older than this is not used: the server may have
/// given up waiting for its startup (PostgreSQL's authentication_timeout
/// is 60 s by default, and may be set lower).
const EARLY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

impl<'a> Early<'a> {
    /// Start connecting when `go` (a session that will be admitted).
    pub fn new(ctx: &'a Ctx, go: bool) -> Self {
        Self { connecting: go.then(|| Box::pin(connect(ctx)) as _), done: None }
    }

    /// Drive the connection until it is made or failed; then never ready.
    pub async fn progress(&mut self) {
        match self.connecting.as_mut() {
            Some(f) => {
                let r = f.as_mut().await;
                self.connecting = None;
                self.done = Some((r, std::time::Instant::now()));
            }
            None => std::future::pending().await,
        }
    }

    async fn finish(self, ctx: &Ctx) -> Result<Stream> {
        match (self.done, self.connecting) {
            (Some((r, at)), _) if at.elapsed() < EARLY_MAX_AGE => r,
            (Some(_), _) => connect(ctx).await,
            (None, Some(f)) => f.await,
            (None, None) => connect(ctx).await,
        }
    }
}

/// Start the session upstream and authenticate. Returns once the client has
/// been sent AuthenticationOk; anything the server sent after it stays in
/// the returned reader for the relay.
pub async fn start(hello: &mut ClientHello, ctx: &Ctx, early: Early<'_>) -> Result<Upstream> {
    let pg = ctx.rule.login.as_ref().ok_or_else(|| anyhow!("intercept {} has no login settings", ctx.rule.name))?;
    let mut stream = early.finish(ctx).await?;
    let mut reader = FrameReader::new(ctx.shared.max_message_bytes());
    let (user, credential) = match &pg.auth {
        AuthMode::Inject { credentials } => {
            let secrets = ctx.shared.secrets();
            let c = secrets.get(credentials).cloned().ok_or_else(|| {
                anyhow!("credentials {credentials:?} (intercept {}) are not in the secrets file", ctx.rule.name)
            })?;
            (c.user.clone(), Some(c))
        }
        AuthMode::Passthrough => {
            let u = hello.params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.clone()).unwrap_or_default();
            (u, None)
        }
    };
    // cordon reads statements and values as UTF-8: the server must too.
    let mut params: Vec<(String, String)> = hello
        .params
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("client_encoding"))
        .map(|(k, v)| if k == "user" { (k.clone(), user.clone()) } else { (k.clone(), v.clone()) })
        .collect();
    params.push(("client_encoding".to_string(), "UTF8".to_string()));
    let mut out = BytesMut::new();
    wire::startup(&mut out, hello.version, &params);
    stream.write_all(&out).await.context("sending the startup message upstream")?;

    let mut scram: Option<scram::Client> = None;
    loop {
        let frame = next(&mut reader, &mut stream).await?;
        match frame.tag {
            b'R' => {
                let mut b = Body::new(frame.body());
                let code = b.i32().context("authentication message without a code")?;
                if credential.is_some() {
                    inject_may_proceed(code, stream.is_tls(), scram.as_ref())?;
                }
                if code == 0 {
                    hello.stream.write_all(&frame.bytes).await?;
                    return Ok(Upstream { stream, reader, user });
                }
                match &credential {
                    Some(c) => {
                        let out = answer(code, &mut b, c, &mut scram)?;
                        if !out.is_empty() {
                            stream.write_all(&out).await.context("answering the server's authentication")?;
                        }
                    }
                    None => {
                        // Passthrough: relay the challenge; wait for the answer
                        // unless it is SASLFinal (followed by Ok or an error).
                        if code == 10 {
                            let mut mechs = sasl_mechanisms(&mut b);
                            mechs.retain(|m| !m.ends_with("-PLUS"));
                            let mut out = BytesMut::new();
                            wire::auth_sasl(&mut out, mechs);
                            hello.stream.write_all(&out).await?;
                        } else {
                            hello.stream.write_all(&frame.bytes).await?;
                        }
                        if code != 12 {
                            let answer = next(&mut hello.reader, &mut hello.stream).await?;
                            if answer.tag != b'p' {
                                bail!(
                                    "expected the client's authentication answer, got message {:?}",
                                    answer.tag as char
                                );
                            }
                            stream.write_all(&answer.bytes).await?;
                        }
                    }
                }
            }
            b'E' => {
                hello.stream.write_all(&frame.bytes).await.ok();
                let e = wire::server_error(frame.body());
                bail!("the server refused the session: {} {}: {}", e.severity, e.code, e.message);
            }
            // NegotiateProtocolVersion and notices go to the client as they are.
            b'v' | b'N' => hello.stream.write_all(&frame.bytes).await?,
            other => bail!("unexpected message {:?} from the server during authentication", other as char),
        }
    }
}

/// Inject mode's rules before answering (or accepting) a request: no
/// cleartext or md5 password without verified TLS, and once SCRAM started,
/// AuthenticationOk only after the server proved it knows the password.
fn inject_may_proceed(code: i32, tls: bool, scram: Option<&scram::Client>) -> Result<()> {
    if code == 0 && scram.is_some_and(|s| !s.verified()) {
        bail!("the server accepted the login without proving it knows the password (SCRAM unfinished)");
    }
    if (code == 3 || code == 5) && !tls {
        bail!(
            "the server asks for a {} password over a connection without verified TLS; cordon will not send it (use upstream_tls = \"verify-full\" or SCRAM)",
            if code == 3 { "cleartext" } else { "md5" }
        );
    }
    Ok(())
}

/// The mechanisms of an AuthenticationSASL request.
fn sasl_mechanisms(b: &mut Body<'_>) -> Vec<String> {
    let mut mechs = Vec::new();
    while let Some(m) = b.cstr() {
        if m.is_empty() {
            break;
        }
        mechs.push(String::from_utf8_lossy(m).into_owned());
    }
    mechs
}

/// Inject mode: answer one authentication request with the credential.
fn answer(code: i32, b: &mut Body<'_>, c: &Credential, scram: &mut Option<scram::Client>) -> Result<BytesMut> {
    let mut out = BytesMut::new();
    let pw = c.password.expose();
    match code {
        3 => wire::password(&mut out, pw.to_string()),
        5 => {
            let salt = b.bytes(4).context("md5 request without a salt")?;
            wire::password(&mut out, scram::md5_password(&c.user, pw, salt));
        }
        10 => {
            let mechs = sasl_mechanisms(b);
            if !mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                bail!("the server offers SASL {mechs:?}; cordon speaks SCRAM-SHA-256");
            }
            let client = scram::Client::new(pw);
            wire::sasl_initial(&mut out, "SCRAM-SHA-256", client.client_first().as_bytes());
            *scram = Some(client);
        }
        11 => {
            let s = scram.as_mut().context("SASLContinue before SASL")?;
            let fin = s.client_final(b.rest())?;
            wire::sasl_response(&mut out, fin.as_bytes());
        }
        12 => {
            let s = scram.as_ref().context("SASLFinal before SASL")?;
            s.verify_server_final(b.rest())?;
        }
        other => bail!("the server asks for authentication method {other}, which inject mode does not speak"),
    }
    Ok(out)
}

/// cordon's own session (for catalog lookups): connect, start as the
/// credential's user on `database`, authenticate, wait for ReadyForQuery.
pub async fn login(ctx: &Ctx, c: &Credential, database: &str) -> Result<(Stream, FrameReader)> {
    let mut stream = connect(ctx).await?;
    let mut reader = FrameReader::new(ctx.shared.max_message_bytes());
    let params = vec![
        ("user".to_string(), c.user.clone()),
        ("database".to_string(), database.to_string()),
        ("application_name".to_string(), "cordon-catalog".to_string()),
    ];
    let mut out = BytesMut::new();
    wire::startup(&mut out, 196_608, &params);
    stream.write_all(&out).await.context("sending the catalog session's startup")?;
    let mut scram = None;
    loop {
        let frame = next(&mut reader, &mut stream).await?;
        match frame.tag {
            b'R' => {
                let mut b = Body::new(frame.body());
                let code = b.i32().context("authentication message without a code")?;
                inject_may_proceed(code, stream.is_tls(), scram.as_ref())?;
                if code != 0 {
                    let out = answer(code, &mut b, c, &mut scram)?;
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                    }
                }
            }
            b'E' => {
                let e = wire::server_error(frame.body());
                bail!("the catalog session was refused: {}: {}", e.code, e.message);
            }
            b'Z' => return Ok((stream, reader)),
            _ => {}
        }
    }
}

pub async fn next(reader: &mut FrameReader, stream: &mut Stream) -> Result<Frame> {
    loop {
        if let Some(f) = reader.next_frame()? {
            return Ok(f);
        }
        if reader.fill(stream).await? == 0 {
            bail!("the connection closed during authentication");
        }
    }
}
