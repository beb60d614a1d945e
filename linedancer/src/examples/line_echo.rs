//! Echo for a line protocol: every line back, framed by [`Lines`].

use crate::codec::Lines;
use crate::protocol::{Ctx, Next, Protocol};

/// Writes back every line it receives, each ending in `\n` (a `\r\n` from telnet comes
/// back as `\n`). The line-framed counterpart of [`Echo`](super::Echo), used to measure
/// the cost of framing. On server shutdown it says goodbye and closes.
#[derive(Debug)]
pub struct LineEcho;

impl Protocol for LineEcho {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(_ctx: &mut Ctx<'_, Self>) -> Self {
        LineEcho
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(line);
        Next::Continue
    }

    fn shutdown(&mut self, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send("server shutting down, goodbye".to_owned());
        Next::Close
    }

    fn state_name(&self) -> &'static str {
        "RECV"
    }
}
