//! cordon's SSH server for one workload connection. Authentication is
//! `none` (the identity is the kernel's; for clients that skip `none`, an
//! offered key or password is accepted and never used, stored or logged).
//! Callbacks return at once: each session channel is driven by its own
//! task (`channel::run`), so a held exec or a slow upstream never stalls
//! the connection. Port forwarding, X11 and agent forwarding are refused.

use std::sync::Arc;

use russh::{
    server::{self, Auth, Msg, Session},
    Channel, ChannelId,
};

use super::Ctx;

pub struct Server {
    pub ctx: Arc<Ctx>,
}

impl Server {
    fn admit(&self, user: &str) -> Auth {
        if self.ctx.refused.is_some() {
            return Auth::reject();
        }
        if let Ok(mut u) = self.ctx.typed_user.lock() {
            u.get_or_insert_with(|| user.chars().take(256).collect());
        }
        Auth::Accept
    }

    fn refuse(&self, what: &str, detail: String) {
        let rec = self.ctx.base.clone().with_event("ssh_refused").with("what", what).with("detail", &detail);
        let _ = self.ctx.shared.audit.append(&rec);
        tracing::warn!(what, "{detail}");
    }
}

impl server::Handler for Server {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(self.ctx.refused.as_ref().map(|r| format!("cordon: {}\r\n", r.message)))
    }

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        Ok(self.admit(user))
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // The workload's password is not cordon's business: never kept.
        Ok(self.admit(user))
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        _offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.admit(user))
    }

    async fn auth_publickey(&mut self, user: &str, _key: server::VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        Ok(self.admit(user))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ctx = self.ctx.clone();
        let task = tokio::spawn(super::channel::run(ctx, channel, reply));
        if let Ok(mut t) = self.ctx.tasks.lock() {
            t.push(task);
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let governed: Vec<u16> = self.ctx.shared.policy().intercepts.iter().map(|i| i.port).collect();
        let why =
            match super::forward::admits(&self.ctx.profile.ssh.forwarding, &governed, host_to_connect, port_to_connect)
            {
                Ok(()) => {
                    let ctx = self.ctx.clone();
                    let target =
                        (host_to_connect.to_string(), port_to_connect, originator_address.to_string(), originator_port);
                    let task = tokio::spawn(super::forward::run(ctx, channel, reply, target));
                    if let Ok(mut t) = self.ctx.tasks.lock() {
                        t.push(task);
                    }
                    return Ok(());
                }
                Err(why) => why,
            };
        self.refuse("port_forwarding", format!("{why} (profile {})", self.ctx.profile.name));
        reply.reject(russh::ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("x11", "X11 forwarding is not allowed".into());
        reply.reject(russh::ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("remote_forwarding", format!("remote port forwarding from {address}:{port} is not allowed"));
        Ok(false)
    }

    async fn streamlocal_forward(&mut self, socket_path: &str, _session: &mut Session) -> Result<bool, Self::Error> {
        self.refuse(
            "remote_forwarding",
            format!("remote forwarding from the Unix socket {socket_path:?} is not allowed"),
        );
        Ok(false)
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("port_forwarding", format!("forwarding to the Unix socket {socket_path:?} is not allowed"));
        reply.reject(russh::ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn agent_request(&mut self, _channel: ChannelId, _session: &mut Session) -> Result<bool, Self::Error> {
        // The workload's agent is never forwarded upstream.
        self.refuse("agent_forwarding", "agent forwarding is not allowed".into());
        Ok(false)
    }
}
