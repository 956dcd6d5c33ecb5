//! Where the kernel's routes send a backend's packets: the egress interface and the next hop
//! (`ip route get ADDR`), asked over a plain (blocking) rtnetlink socket, so that the code that
//! writes the maps can ask while it writes them.
//!
//! The egress interface is the backend's *side*: replies are translated back to the VIP only
//! when they arrive there (`Reverse::ifindex`), so a packet that merely carries a backend's source
//! address, sent from the client side, is never re-sourced to the VIP.

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use rtnetlink::{
    RouteMessageBuilder,
    packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        route::{RouteAddress, RouteAttribute, RouteMessage},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

/// The route to one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    /// The interface the route leaves by.
    pub ifindex: u32,
    /// The next hop: the gateway, or the address itself when it is on a connected network.
    pub via: IpAddr,
}

/// The route the kernel would take to `addr` from this host, or None when it has no usable
/// route (unreachable, prohibited, blackholed, or no route at all).
pub fn egress(addr: IpAddr) -> Result<Option<Egress>> {
    let mut msg = match addr {
        IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().destination_prefix(a, 32).build(),
        IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().destination_prefix(a, 128).build(),
    };
    // A lookup, not a dump: no table or protocol filters.
    msg.header.table = 0;
    msg.header.protocol = Default::default();
    msg.header.scope = Default::default();
    msg.header.kind = Default::default();
    let reply = request(RouteNetlinkMessage::GetRoute(msg)).with_context(|| format!("looking up the route to {addr}"))?;
    Ok(reply.and_then(|m| parse(addr, &m)))
}

fn parse(addr: IpAddr, m: &RouteMessage) -> Option<Egress> {
    use rtnetlink::packet_route::route::RouteType;
    if m.header.kind != RouteType::Unicast && m.header.kind != RouteType::Local {
        return None;
    }
    let mut ifindex = None;
    let mut via = addr;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = IpAddr::V4(*g),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => via = IpAddr::V6(*g),
            _ => {}
        }
    }
    ifindex.map(|ifindex| Egress { ifindex, via })
}

/// Sends one request and returns the kernel's answer: the route, or None for an error answer
/// that means "no route" (ENETUNREACH, EHOSTUNREACH, EACCES, EINVAL...).
fn request(payload: RouteNetlinkMessage) -> Result<Option<RouteMessage>> {
    match ask(payload)? {
        Ok(Some(RouteNetlinkMessage::NewRoute(r))) => Ok(Some(r)),
        Ok(_) => Ok(None),
        Err(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EINVAL | libc::ESRCH) => Ok(None),
        Err(errno) => bail!("the kernel answered {}", std::io::Error::from_raw_os_error(errno)),
    }
}

/// One rtnetlink request on a blocking socket of this thread's network namespace: the first
/// message of the answer (`None` if it had none), or the errno the kernel answered with.
pub(crate) fn ask(payload: RouteNetlinkMessage) -> Result<std::result::Result<Option<RouteNetlinkMessage>, i32>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("connecting a netlink socket")?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("sending a netlink request")?;
    let mut rx = Vec::with_capacity(8192);
    loop {
        rx.clear();
        socket.recv(&mut rx, 0).context("reading a netlink answer")?;
        let mut off = 0;
        while off < rx.len() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..]).context("decoding a netlink answer")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => return Ok(Ok(Some(m))),
                NetlinkPayload::Error(e) if e.code.is_some() => return Ok(Err(-e.code.map_or(0, |c| c.get()))),
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => return Ok(Ok(None)),
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_routes_through_lo() {
        // Every network namespace has lo (ifindex 1) and a local route for 127.0.0.1.
        let e = egress("127.0.0.1".parse().unwrap()).unwrap().expect("a route to 127.0.0.1");
        assert_eq!(e.ifindex, 1);
        assert_eq!(e.via, "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
