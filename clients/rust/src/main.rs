//! `qun-cli`: talk to a Qun server from the command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qun_client::{Client, ClientError, Event, proto};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "qun-cli", version, about = "Command-line client for Qun")]
struct Cli {
    /// Server WebSocket URL.
    #[arg(
        long,
        env = "QUN_URL",
        default_value = "ws://127.0.0.1:7700/ws",
        global = true
    )]
    url: String,
    /// Token from `qun token`.
    #[arg(long, env = "QUN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Join a group (prints its name and the latest messages).
    Join { group: u64 },
    /// Leave a group.
    Leave { group: u64 },
    /// Post a message; prints its seq. On a lost connection it reconnects
    /// and sends again with the same client message id, so the message is
    /// posted once however many tries it takes.
    Send {
        group: u64,
        text: String,
        /// Seq of the message being answered.
        #[arg(long)]
        reply_to: Option<u64>,
        /// The client message id (default: a fresh random one). Sending
        /// again with the same id prints the original seq.
        #[arg(long)]
        client_msg_id: Option<String>,
        /// Tries after a connection failure before giving up.
        #[arg(long, default_value_t = 5)]
        retries: u32,
    },
    /// Print a page of history (older than --before).
    History {
        group: u64,
        #[arg(long)]
        before: Option<u64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Stream live messages (joining the group if needed).
    Tail {
        group: u64,
        /// First print every message from this seq on, then live ones.
        #[arg(long)]
        from: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a group for your shop; prints its id.
    Create {
        #[arg(long)]
        name: String,
        /// 0 for the server default.
        #[arg(long, default_value_t = 0)]
        max_members: u32,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(token) = cli.token.clone() else {
        eprintln!("qun-cli: a token is required (--token or QUN_TOKEN); get one with `qun token`");
        return ExitCode::from(2);
    };
    match run(cli, &token).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                ClientError::Server { code, message } => {
                    eprintln!(
                        "qun-cli: error {code} {}: {message}",
                        qun_client::code_name(*code)
                    );
                }
                other => eprintln!("qun-cli: {other}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, token: &str) -> Result<(), ClientError> {
    if let Command::Send {
        group,
        text,
        reply_to,
        client_msg_id,
        retries,
    } = &cli.command
    {
        let id = client_msg_id
            .clone()
            .unwrap_or_else(qun_client::new_client_msg_id);
        let ack =
            send_with_retries(&cli.url, token, *group, text, *reply_to, &id, *retries).await?;
        println!("{}", ack.seq);
        return Ok(());
    }
    let mut client = Client::connect(&cli.url, token).await?;
    match cli.command {
        Command::Group {
            command: GroupCommand::Create { name, max_members },
        } => {
            let info = client.create_group(&name, max_members).await?;
            println!("{}", info.group_id);
        }
        Command::Join { group } => {
            let joined = client.join(group).await?;
            let info = joined.group.unwrap_or_default();
            eprintln!(
                "joined group {} \"{}\" of shop {} ({} members)",
                info.group_id, info.name, info.shop_id, info.member_count
            );
            for m in &joined.recent {
                println!("{}", human(m));
            }
        }
        Command::Leave { group } => client.leave(group).await?,
        Command::Send { .. } => unreachable!("handled above"),
        Command::History {
            group,
            before,
            limit,
            json,
        } => {
            let page = client.history(group, before.unwrap_or(0), limit).await?;
            for m in &page.messages {
                println!("{}", if json { as_json(m) } else { human(m) });
            }
        }
        Command::Tail {
            group,
            from,
            json,
            count,
        } => {
            client.join(group).await?;
            if let Some(from) = from {
                // Catch up from `from`, then live; the client drops what
                // the join already pushed twice.
                let resumed = client.resume(&[(group, from.saturating_sub(1))]).await?;
                if let Some(r) = resumed.first().filter(|r| r.error != 0) {
                    return Err(ClientError::Server {
                        code: r.error,
                        message: format!("cannot resume group {group}"),
                    });
                }
            }
            let print = |m: &proto::ChatMessage| {
                println!("{}", if json { as_json(m) } else { human(m) });
            };
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                match client.next_event().await {
                    Some(Event::Message(m)) if m.group_id == group => {
                        print(&m);
                        seen += 1;
                    }
                    Some(Event::Gap {
                        group_id,
                        after_seq,
                        through_seq,
                    }) if group_id == group => {
                        // Too far behind to be pushed: page it.
                        let mut after = after_seq;
                        while after < through_seq && count.is_none_or(|c| seen < c) {
                            let page = client.fetch_range(group, after, 200).await?;
                            let Some(last) = page.messages.last().map(|m| m.seq) else {
                                break;
                            };
                            for m in page.messages.iter().filter(|m| m.seq <= through_seq) {
                                if count.is_none_or(|c| seen < c) {
                                    print(m);
                                    seen += 1;
                                }
                            }
                            after = last;
                        }
                    }
                    Some(Event::OutOfSync { dropped }) => {
                        eprintln!("qun-cli: fell behind ({dropped} pushes dropped); resumed");
                    }
                    Some(Event::GoingAway { reason, .. }) => eprintln!("qun-cli: {reason}"),
                    Some(Event::Closed { .. }) | None => return Err(ClientError::Closed),
                    Some(_) => {}
                }
            }
        }
    }
    Ok(())
}

/// Sends once, reconnecting and resending with the same client message id
/// after connection failures (with a growing pause), so a flaky network
/// never posts the message twice.
async fn send_with_retries(
    url: &str,
    token: &str,
    group: u64,
    text: &str,
    reply_to: Option<u64>,
    client_msg_id: &str,
    retries: u32,
) -> Result<proto::SendAck, ClientError> {
    let mut pause = std::time::Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        let tried = async {
            let client = Client::connect(url, token).await?;
            client
                .send_with_id(group, text, reply_to, client_msg_id)
                .await
        }
        .await;
        match tried {
            Err(e) if e.is_connection_error() && attempt < retries => {
                attempt += 1;
                eprintln!("qun-cli: {e}; retrying ({attempt}/{retries}) with the same message id");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

fn kind_name(kind: i32) -> &'static str {
    match proto::MessageKind::try_from(kind) {
        Ok(proto::MessageKind::Text) => "text",
        _ => "unknown",
    }
}

fn as_json(m: &proto::ChatMessage) -> String {
    let mut v = json!({
        "group": m.group_id,
        "seq": m.seq,
        "sender": m.sender_id,
        "sender_name": m.sender_name,
        "kind": kind_name(m.kind),
        "text": m.text,
        "ts": m.ts_ms,
    });
    if m.reply_to != 0 {
        v["reply_to"] = json!(m.reply_to);
    }
    v.to_string()
}

fn human(m: &proto::ChatMessage) -> String {
    let quote = m
        .quote
        .as_ref()
        .map(|q| format!(" [re #{} {}: {}]", q.seq, q.sender_name, q.text))
        .unwrap_or_default();
    format!(
        "#{} {} ({}){}: {}",
        m.seq, m.sender_name, m.sender_id, quote, m.text
    )
}
