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
    /// Post a message; prints its seq.
    Send {
        group: u64,
        text: String,
        /// Seq of the message being answered.
        #[arg(long)]
        reply_to: Option<u64>,
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
    /// Stream live messages.
    Tail {
        group: u64,
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
        Command::Send {
            group,
            text,
            reply_to,
        } => {
            let ack = client.send(group, &text, reply_to).await?;
            println!("{}", ack.seq);
        }
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
        Command::Tail { group, json, count } => {
            client.join(group).await?;
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                match client.next_event().await {
                    Some(Event::Message(m)) if m.group_id == group => {
                        println!("{}", if json { as_json(&m) } else { human(&m) });
                        seen += 1;
                    }
                    Some(Event::OutOfSync { dropped }) => {
                        eprintln!(
                            "qun-cli: fell behind; {dropped} messages were dropped (see `history`)"
                        );
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
