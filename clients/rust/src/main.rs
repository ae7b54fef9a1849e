//! `qun-cli`: talk to a Qun server from the command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qun_client::{Client, ClientError, ClientOptions, Event, proto};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "qun-cli", version, about = "Command-line client for Qun")]
struct Cli {
    /// Server URL: `ws://HOST:PORT/ws`, or `quic://HOST:PORT` with
    /// --cert-fingerprint (or --insecure-dev-cert).
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
    /// For quic:// URLs: the SHA-256 of the server's certificate, as
    /// `qun serve` prints it (cert_sha256=...).
    #[arg(long, env = "QUN_CERT_FINGERPRINT", global = true)]
    cert_fingerprint: Option<String>,
    /// For quic:// URLs: accept any certificate. Development only.
    #[arg(long, global = true)]
    insecure_dev_cert: bool,
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
    /// Product cards.
    Card {
        #[command(subcommand)]
        command: CardCommand,
    },
    /// Group-buys (拼团).
    #[command(name = "groupbuy")]
    GroupBuy {
        #[command(subcommand)]
        command: GroupBuyCommand,
    },
    /// Coupons.
    Coupon {
        #[command(subcommand)]
        command: CouponCommand,
    },
    /// Polls.
    Poll {
        #[command(subcommand)]
        command: PollCommand,
    },
    /// The group's reach quota (staff).
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
    /// Report a message to the shop and the platform.
    Report {
        group: u64,
        seq: u64,
        /// Why (1 to 500 characters).
        #[arg(long)]
        reason: String,
    },
    /// Mute or unmute a group's promotions (they arrive as hidden
    /// placeholders); answers and chatter still arrive.
    Promotions {
        #[command(subcommand)]
        command: PromotionsCommand,
    },
    /// Mute a buyer (staff): `mute GROUP USER --for 10m`; `--off` unmutes.
    Mute {
        group: u64,
        user: String,
        /// How long, e.g. 10m, 2h, 1d.
        #[arg(long = "for", required_unless_present = "off")]
        duration: Option<humantime::Duration>,
        /// Unmute instead.
        #[arg(long, conflicts_with = "duration")]
        off: bool,
    },
    /// Mute or unmute every buyer of a group (staff).
    MuteAll {
        group: u64,
        /// Unmute instead.
        #[arg(long)]
        off: bool,
    },
    /// Remove a buyer from a group (staff), optionally barring them.
    Remove {
        group: u64,
        user: String,
        /// How long they cannot join again, e.g. 7d.
        #[arg(long)]
        ban: Option<humantime::Duration>,
    },
    /// Let buyers join freely, on approval, or by tags (staff).
    Policy {
        group: u64,
        /// open, approval or threshold.
        policy: String,
        /// For threshold: a tag expression, e.g. "tier:vip OR size:s".
        #[arg(long)]
        expr: Option<String>,
    },
    /// Add or remove a buyer's tags in your shop (staff); prints them and
    /// the tier.
    Tag {
        user: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Print the industry tag pool: tags every shop uses with one meaning.
    #[command(name = "tag-pool")]
    TagPool,
    /// Push a product card or an announcement now (staff); takes one unit
    /// of the reach quota. With --tags, only buyers whose tags match get
    /// it. Prints the seq and whom it reached.
    Push {
        group: u64,
        #[command(flatten)]
        what: PushArgs,
    },
    /// Scheduled pushes (staff).
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// Exclusive customer service (专属客服): one-to-one sessions between
    /// a buyer and the shop's agents.
    Cs {
        #[command(subcommand)]
        command: CsCommand,
    },
    /// Buyers waiting for approval (staff).
    Requests { group: u64 },
    /// Approve a buyer's request to join (staff).
    Approve { group: u64, user: String },
    /// Reject a buyer's request to join (staff).
    Reject { group: u64, user: String },
    /// Recall (撤回) a message: your own within 2 minutes, any as staff.
    /// Prints the seq of the RECALL message.
    Recall { group: u64, seq: u64 },
    /// The group's FAQ: list it; staff promote a question and its answer,
    /// or remove an entry.
    Faq {
        #[command(subcommand)]
        command: FaqCommand,
    },
    /// The shop's auto-reply rules (staff): the bot answers questions that
    /// match one.
    #[command(name = "autoreply")]
    AutoReply {
        #[command(subcommand)]
        command: AutoReplyCommand,
    },
    /// Pin (or unpin, with --off) a message or an FAQ entry (staff).
    Pin {
        group: u64,
        /// A message's seq.
        #[arg(long, conflicts_with = "faq", required_unless_present = "faq")]
        message: Option<u64>,
        /// An FAQ entry's id.
        #[arg(long)]
        faq: Option<u64>,
        /// Unpin instead.
        #[arg(long)]
        off: bool,
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

/// What a push carries, and to whom.
#[derive(clap::Args, Debug)]
struct PushArgs {
    /// A product of your shop: push its card.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    card: Option<String>,
    /// An announcement's text.
    #[arg(long)]
    text: Option<String>,
    /// Only buyers matching this tag expression, e.g. "vip AND size:s".
    #[arg(long, default_value = "")]
    tags: String,
}

impl PushArgs {
    fn push(&self) -> qun_client::Push {
        match (&self.card, &self.text) {
            (Some(id), _) => qun_client::Push::Card(id.clone()),
            (None, t) => qun_client::Push::Announcement(t.clone().unwrap_or_default()),
        }
    }
}

#[derive(Subcommand, Debug)]
enum CsCommand {
    /// Open your session with SHOP (buyer), or, as a buyer's assigned
    /// agent, contact them first with --buyer. Prints the session.
    Open {
        #[arg(required_unless_present = "buyer")]
        shop: Option<String>,
        #[arg(long, conflicts_with = "shop")]
        buyer: Option<String>,
    },
    /// Send a message in a session (a buyer's reopens a closed one).
    Send { session: u64, text: String },
    /// Stream a session's messages.
    Tail {
        session: u64,
        /// First print every message from this seq on.
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        count: Option<u64>,
    },
    /// Hand a session to another agent of the shop (staff).
    Transfer {
        session: u64,
        agent: String,
        /// For the agent taking over; the buyer does not see it.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Close a session.
    Close { session: u64 },
    /// The queue and agents (staff: SHOP is yours), or your place in it.
    Queue {
        #[arg(default_value = "")]
        shop: String,
    },
    /// Set your presence (online, busy, away) and print sessions as they
    /// are assigned to you, until --count of them (agents).
    Presence {
        presence: String,
        /// Exit after this many session changes (default: at once).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Block (or with --off unblock) proactive contact from SHOP (buyer).
    Block {
        shop: String,
        #[arg(long)]
        off: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ScheduleCommand {
    /// Schedule a push; prints the schedule's id.
    Add {
        group: u64,
        #[command(flatten)]
        what: PushArgs,
        /// The first occurrence, RFC 3339: 2026-12-07T09:00:00+08:00.
        #[arg(long, conflicts_with = "after", required_unless_present = "after")]
        at: Option<String>,
        /// Or: the first occurrence this long from now, e.g. 1h.
        #[arg(long = "in")]
        after: Option<humantime::Duration>,
        /// Repeat this often, e.g. 7d (at least 1h); once without it.
        #[arg(long)]
        every: Option<humantime::Duration>,
    },
    /// Print the group's schedules.
    List {
        group: u64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a schedule.
    Cancel { group: u64, id: u64 },
}

#[derive(Subcommand, Debug)]
enum AutoReplyCommand {
    /// Create or replace a rule.
    Set {
        /// The rule's id.
        id: String,
        /// A word the question must contain (repeat for more).
        #[arg(long = "keyword")]
        keywords: Vec<String>,
        /// A regular expression the question must match.
        #[arg(long, default_value = "")]
        pattern: String,
        /// The bot's answer.
        #[arg(long)]
        answer: String,
        /// Least time between two answers in one group, e.g. 1m.
        #[arg(long)]
        cooldown: Option<humantime::Duration>,
    },
    /// Print the rules.
    List,
    /// Remove a rule.
    Remove { id: String },
}

#[derive(Subcommand, Debug)]
enum FaqCommand {
    /// Print the FAQ and the pins.
    List {
        group: u64,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make the message QUESTION and the message ANSWER an FAQ entry.
    Promote {
        group: u64,
        question: u64,
        answer: u64,
    },
    /// Remove an FAQ entry.
    Remove { group: u64, id: u64 },
}

#[derive(Subcommand, Debug)]
enum QuotaCommand {
    /// Today's promotions, the limit and the shop's buyer feedback.
    Show {
        group: u64,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PromotionsCommand {
    /// Stop getting the group's promotions.
    Mute { group: u64 },
    /// Get them again.
    Unmute { group: u64 },
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

#[derive(Subcommand, Debug)]
enum CardCommand {
    /// Create or update the product, then post its card; prints the seq.
    Post {
        group: u64,
        #[arg(long)]
        product: String,
        #[arg(long)]
        title: String,
        /// Price in minor units (fen for CNY).
        #[arg(long, allow_negative_numbers = true)]
        price: i64,
        #[arg(long, allow_negative_numbers = true)]
        member_price: Option<i64>,
        #[arg(long, default_value = "CNY")]
        currency: String,
        #[arg(long)]
        stock: Option<u32>,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        link: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum GroupBuyCommand {
    /// Start a group-buy of a product of your shop; prints its id alone.
    Start {
        group: u64,
        #[arg(long)]
        product: String,
        /// The group price in minor units.
        #[arg(long, allow_negative_numbers = true)]
        price: i64,
        /// Buyers needed for the deal.
        #[arg(long)]
        target: u32,
        /// Most buyers (the stock).
        #[arg(long)]
        slots: u32,
        /// Time until the deadline, e.g. `10m` or `1h 30m`.
        #[arg(long)]
        ends_in: humantime::Duration,
    },
    /// Join; prints `joined`, `already-joined`, `sold-out`, `closed` or
    /// `not-started`.
    Join { group: u64, id: u64 },
    /// Leave while open; prints `left`, `not-joined` or `closed`.
    Leave { group: u64, id: u64 },
    /// Print the state, joined count, slots and deadline.
    Show {
        group: u64,
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Cancel (staff).
    Cancel { group: u64, id: u64 },
}

#[derive(Subcommand, Debug)]
enum CouponCommand {
    /// Issue a coupon; prints its id alone.
    Issue {
        group: u64,
        #[arg(long)]
        title: String,
        /// The discount in minor units.
        #[arg(long, allow_negative_numbers = true)]
        amount: i64,
        /// The order total from which it applies, minor units.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        min_spend: i64,
        #[arg(long, default_value = "CNY")]
        currency: String,
        /// How many in all.
        #[arg(long)]
        quantity: u32,
        /// How many one buyer may claim.
        #[arg(long, default_value_t = 1)]
        per_buyer: u32,
        /// Time until it expires, e.g. `7d`.
        #[arg(long)]
        expires_in: humantime::Duration,
    },
    /// Claim one; prints `claimed`, `exhausted`, `expired` or
    /// `limit-reached`.
    Claim { group: u64, id: u64 },
    /// Print its state.
    Show {
        group: u64,
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PollCommand {
    /// Open a poll; prints its id alone.
    Open {
        group: u64,
        #[arg(long)]
        question: String,
        /// An option; give 2 to 10.
        #[arg(long = "option", required = true)]
        options: Vec<String>,
        /// Time until it closes, e.g. `1d`.
        #[arg(long)]
        ends_in: humantime::Duration,
        /// A buyer's first vote is final.
        #[arg(long)]
        r#final: bool,
    },
    /// Vote for an option (0-based); prints `voted` or `vote-closed`.
    Vote { group: u64, id: u64, option: u32 },
    /// Print the tallies.
    Show {
        group: u64,
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Close now (staff); the final result is broadcast.
    Close { group: u64, id: u64 },
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

async fn run(mut cli: Cli, token: &str) -> Result<(), ClientError> {
    // A session is a group: `cs send` and `cs tail` are `send` and `tail`.
    cli.command = match cli.command {
        Command::Cs {
            command: CsCommand::Send { session, text },
        } => Command::Send {
            group: session,
            text,
            reply_to: None,
            client_msg_id: None,
            retries: 5,
        },
        Command::Cs {
            command:
                CsCommand::Tail {
                    session,
                    from,
                    json,
                    count,
                },
        } => Command::Tail {
            group: session,
            from,
            json,
            count,
        },
        other => other,
    };
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
        let server = Server {
            url: &cli.url,
            token,
            options: options(&cli),
        };
        let ack = send_with_retries(&server, *group, text, *reply_to, &id, *retries).await?;
        println!("{}", ack.seq);
        return Ok(());
    }
    let mut client = Client::connect_with(&cli.url, token, options(&cli)).await?;
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
        Command::Card { command } => card(&client, command).await?,
        Command::GroupBuy { command } => group_buy(&client, command).await?,
        Command::Coupon { command } => coupon(&client, command).await?,
        Command::Poll { command } => poll(&client, command).await?,
        Command::Quota {
            command: QuotaCommand::Show { group, json },
        } => {
            let q = client.reach_quota(group).await?;
            let score = f64::from(q.score_milli) / 1000.0;
            if json {
                println!(
                    "{}",
                    json!({
                        "group": q.group_id,
                        "used": q.used,
                        "limit": q.limit,
                        "base": q.base,
                        "resets_at_ms": q.resets_at_ms,
                        "score": score,
                        "positive": q.positive,
                        "negative": q.negative,
                    })
                );
            } else if q.limit == 0 {
                println!("{} promotions today; the reach quota is off", q.used);
            } else {
                println!(
                    "{}/{} promotions today (base {}, score {score:+.3} from {} positive and {} negative signals); resets at {} ms",
                    q.used, q.limit, q.base, q.positive, q.negative, q.resets_at_ms
                );
            }
        }
        Command::Report { group, seq, reason } => {
            client.report_message(group, seq, &reason).await?;
            println!("reported");
        }
        Command::Mute {
            group,
            user,
            duration,
            off,
        } => {
            let ms = match (off, duration) {
                (false, Some(d)) => {
                    u64::try_from(std::time::Duration::from(d).as_millis()).unwrap_or(u64::MAX)
                }
                _ => 0,
            };
            client.mute_member(group, &user, ms).await?;
            println!("{}", if ms == 0 { "unmuted" } else { "muted" });
        }
        Command::MuteAll { group, off } => {
            client.mute_all_buyers(group, !off).await?;
            println!(
                "{}",
                if off {
                    "buyers unmuted"
                } else {
                    "buyers muted"
                }
            );
        }
        Command::Remove { group, user, ban } => {
            let ban_ms = ban.map_or(0, |d| {
                u64::try_from(std::time::Duration::from(d).as_millis()).unwrap_or(u64::MAX)
            });
            client.remove_member(group, &user, ban_ms).await?;
            println!("removed");
        }
        Command::Policy {
            group,
            policy,
            expr,
        } => {
            let p = match policy.as_str() {
                "open" => proto::JoinPolicy::Open,
                "approval" => proto::JoinPolicy::Approval,
                "threshold" => proto::JoinPolicy::Threshold,
                other => {
                    eprintln!("qun-cli: policy {other:?}: use open, approval or threshold");
                    std::process::exit(2);
                }
            };
            client
                .set_join_policy(group, p, expr.as_deref().unwrap_or(""))
                .await?;
            println!("{policy}");
        }
        Command::Tag { user, add, remove } => {
            let add: Vec<&str> = add.iter().map(String::as_str).collect();
            let remove: Vec<&str> = remove.iter().map(String::as_str).collect();
            let t = client.tag_buyer(&user, &add, &remove).await?;
            println!("{} [{}] tier {}", t.user_id, t.tags.join(" "), t.tier);
        }
        Command::TagPool => {
            for g in client.tag_pool().await?.groups {
                println!("{}: {} ({})", g.name, g.tags.join(" "), g.description);
            }
        }
        Command::Push { group, what } => {
            let p = client
                .push_promotion(group, &what.push(), &what.tags)
                .await?;
            if what.tags.is_empty() {
                println!("{} to everyone", p.seq);
            } else {
                println!("{} to {} buyers", p.seq, p.audience_size);
            }
        }
        Command::Schedule { command } => schedule(&client, command).await?,
        Command::Cs { command } => cs(&mut client, command).await?,
        Command::Requests { group } => {
            for r in client.list_join_requests(group).await?.requests {
                println!(
                    "{} ({}) at {}",
                    r.user_id, r.display_name, r.requested_at_ms
                );
            }
        }
        Command::Approve { group, user } => {
            client.decide_join(group, &user, true).await?;
            println!("approved");
        }
        Command::Reject { group, user } => {
            client.decide_join(group, &user, false).await?;
            println!("rejected");
        }
        Command::Recall { group, seq } => {
            println!("{}", client.recall(group, seq).await?.seq);
        }
        Command::Faq { command } => {
            let (board, json_out) = match command {
                FaqCommand::List { group, json } => (client.list_faq(group).await?, json),
                FaqCommand::Promote {
                    group,
                    question,
                    answer,
                } => (client.promote_faq(group, question, answer).await?, false),
                FaqCommand::Remove { group, id } => (client.remove_faq(group, id).await?, false),
            };
            print_board(&board, json_out);
        }
        Command::AutoReply { command } => {
            let rules = match command {
                AutoReplyCommand::Set {
                    id,
                    keywords,
                    pattern,
                    answer,
                    cooldown,
                } => {
                    let cooldown_ms = cooldown.map_or(0, |d| {
                        u64::try_from(std::time::Duration::from(d).as_millis()).unwrap_or(u64::MAX)
                    });
                    client
                        .put_auto_reply(proto::AutoReplyRule {
                            rule_id: id,
                            keywords,
                            pattern,
                            answer,
                            cooldown_ms,
                        })
                        .await?
                }
                AutoReplyCommand::List => client.list_auto_replies().await?,
                AutoReplyCommand::Remove { id } => client.remove_auto_reply(&id).await?,
            };
            for r in &rules.rules {
                println!(
                    "{}: keywords {:?} pattern {:?} -> {}",
                    r.rule_id, r.keywords, r.pattern, r.answer
                );
            }
        }
        Command::Pin {
            group,
            message,
            faq,
            off,
        } => {
            let target = match (message, faq) {
                (Some(seq), _) => proto::pin::Target::MessageSeq(seq),
                (None, Some(id)) => proto::pin::Target::FaqId(id),
                (None, None) => unreachable!("clap requires --message or --faq"),
            };
            let board = client.set_pin(group, target, !off).await?;
            print_board(&board, false);
        }
        Command::Promotions { command } => {
            let (group, muted) = match command {
                PromotionsCommand::Mute { group } => (group, true),
                PromotionsCommand::Unmute { group } => (group, false),
            };
            client.mute_promotions(group, muted).await?;
            println!("{}", if muted { "muted" } else { "unmuted" });
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

/// Client options from the command line.
fn options(cli: &Cli) -> ClientOptions {
    ClientOptions {
        cert_sha256: cli.cert_fingerprint.clone(),
        insecure_dev_cert: cli.insecure_dev_cert,
        ..ClientOptions::default()
    }
}

/// A buyer's result as the CLI prints it: `already-joined`.
fn result_name(a: &proto::CommerceAnswer) -> String {
    a.result()
        .as_str_name()
        .trim_start_matches("COMMERCE_RESULT_")
        .to_ascii_lowercase()
        .replace('_', "-")
}

fn print_session(s: &proto::CsSession) {
    let state = match s.state() {
        proto::CsState::Open => format!("open with {}", s.agent_id),
        proto::CsState::Queued => format!("queued at {}", s.queue_position),
        _ => "closed".to_string(),
    };
    let context = s
        .context
        .as_ref()
        .map(|c| {
            let note = if c.note.is_empty() {
                String::new()
            } else {
                format!(" note: {}", c.note)
            };
            format!(
                " [tier {}; tags {}; {} groups]{note}",
                c.tier,
                c.tags.join(" "),
                c.groups.len()
            )
        })
        .unwrap_or_default();
    println!(
        "session {} of {} with {}: {state}{context}",
        s.session_id, s.buyer_id, s.shop_id
    );
}

async fn cs(client: &mut Client, command: CsCommand) -> Result<(), ClientError> {
    match command {
        CsCommand::Open { shop, buyer } => {
            let s = match (shop, buyer) {
                (_, Some(b)) => client.cs_contact(&b).await?,
                (Some(shop), None) => client.cs_open(&shop).await?,
                (None, None) => unreachable!("clap requires one"),
            };
            print_session(&s);
        }
        CsCommand::Transfer {
            session,
            agent,
            note,
        } => print_session(&client.cs_transfer(session, &agent, &note).await?),
        CsCommand::Close { session } => print_session(&client.cs_close(session).await?),
        CsCommand::Queue { shop } => {
            let q = client.cs_queue(&shop).await?;
            for s in &q.waiting {
                print_session(s);
            }
            for a in &q.agents {
                println!(
                    "agent {} {}: {}/{} sessions",
                    a.agent_id,
                    a.presence()
                        .as_str_name()
                        .trim_start_matches("PRESENCE_")
                        .to_lowercase(),
                    a.sessions,
                    a.cap
                );
            }
        }
        CsCommand::Presence { presence, count } => {
            let p = match presence.as_str() {
                "online" => proto::Presence::Online,
                "busy" => proto::Presence::Busy,
                "away" => proto::Presence::Away,
                other => {
                    eprintln!("qun-cli: presence {other:?}: use online, busy or away");
                    std::process::exit(2);
                }
            };
            client.set_presence(p).await?;
            println!("{presence}");
            let mut seen = 0;
            while seen < count {
                match client.next_event().await {
                    Some(Event::CsSession(s)) => {
                        print_session(&s);
                        seen += 1;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
        CsCommand::Block { shop, off } => {
            client.cs_block(&shop, !off).await?;
            println!("{}", if off { "unblocked" } else { "blocked" });
        }
        CsCommand::Send { .. } | CsCommand::Tail { .. } => {
            unreachable!("rewritten to send and tail")
        }
    }
    Ok(())
}

async fn schedule(client: &Client, command: ScheduleCommand) -> Result<(), ClientError> {
    match command {
        ScheduleCommand::Add {
            group,
            what,
            at,
            after,
            every,
        } => {
            let first = match (at, after) {
                (Some(at), _) => match parse_at(&at) {
                    Ok(ms) => ms,
                    Err(e) => {
                        eprintln!("qun-cli: --at {at:?}: {e}");
                        std::process::exit(2);
                    }
                },
                (None, Some(d)) => server_time_in(client, d).await?,
                (None, None) => unreachable!("clap requires one of --at and --in"),
            };
            let every_ms = every.map_or(0, |d| {
                u64::try_from(std::time::Duration::from(d).as_millis()).unwrap_or(u64::MAX)
            });
            let s = client
                .schedule_push(group, &what.push(), &what.tags, first, every_ms)
                .await?;
            println!("{}", s.created);
        }
        ScheduleCommand::List { group, json } => {
            for s in client.list_schedules(group).await?.schedules {
                let c = s.content.unwrap_or_default();
                let what = match c.kind {
                    Some(proto::push_content::Kind::ProductId(p)) => format!("card {p}"),
                    Some(proto::push_content::Kind::Announcement(t)) => {
                        format!("announcement {t:?}")
                    }
                    None => String::new(),
                };
                if json {
                    println!(
                        "{}",
                        json!({
                            "schedule_id": s.schedule_id,
                            "what": what,
                            "audience": c.audience,
                            "first_at_ms": s.first_at_ms,
                            "every_ms": s.every_ms,
                            "next_at_ms": s.next_at_ms,
                            "fired": s.fired,
                            "skipped": s.skipped,
                            "last_seq": s.last_seq,
                            "last_outcome": s.last_outcome,
                        })
                    );
                } else {
                    let to = if c.audience.is_empty() {
                        "everyone".to_string()
                    } else {
                        format!("[{}]", c.audience)
                    };
                    println!(
                        "{} {what} to {to}: next {} every {} ms; fired {}, skipped {}{}",
                        s.schedule_id,
                        s.next_at_ms,
                        s.every_ms,
                        s.fired,
                        s.skipped,
                        if s.last_outcome.is_empty() {
                            String::new()
                        } else {
                            format!(" (last: {})", s.last_outcome)
                        }
                    );
                }
            }
        }
        ScheduleCommand::Cancel { group, id } => {
            client.cancel_schedule(group, id).await?;
            println!("cancelled");
        }
    }
    Ok(())
}

/// RFC 3339 with `Z` or an offset (`+08:00`) to ms since the Unix epoch.
fn parse_at(at: &str) -> Result<u64, String> {
    let (local, offset_s) = match at.len().checked_sub(6).map(|i| at.split_at(i)) {
        Some((local, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let hours: i64 = off[1..3].parse().map_err(|_| "bad offset hours")?;
            let minutes: i64 = off[4..].parse().map_err(|_| "bad offset minutes")?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (local, sign * (hours * 3600 + minutes * 60))
        }
        _ => (at.trim_end_matches('Z'), 0),
    };
    let t = humantime::parse_rfc3339_weak(local).map_err(|e| e.to_string())?;
    let utc = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as i64
        - offset_s * 1000;
    u64::try_from(utc).map_err(|_| "before 1970".to_string())
}

/// Milliseconds since the Unix epoch, `d` from now by the server's clock
/// (measured with a ping first).
async fn server_time_in(client: &Client, d: humantime::Duration) -> Result<u64, ClientError> {
    client.ping().await?;
    let now = u64::try_from(client.server_now_ms()).unwrap_or(0);
    let d = u64::try_from(std::time::Duration::from(d).as_millis()).unwrap_or(u64::MAX);
    Ok(now.saturating_add(d))
}

async fn card(client: &Client, command: CardCommand) -> Result<(), ClientError> {
    let CardCommand::Post {
        group,
        product,
        title,
        price,
        member_price,
        currency,
        stock,
        image,
        link,
    } = command;
    let req = proto::PostCard {
        group_id: group,
        product_id: product.clone(),
        product: Some(proto::Product {
            product_id: product,
            title,
            price_minor: price,
            member_price_minor: member_price.unwrap_or(0),
            currency,
            stock_hint: stock.unwrap_or(0),
            image_url: image.unwrap_or_default(),
            link: link.unwrap_or_default(),
            ..Default::default()
        }),
    };
    println!("{}", client.post_card(req).await?.seq);
    Ok(())
}

async fn group_buy(client: &Client, command: GroupBuyCommand) -> Result<(), ClientError> {
    match command {
        GroupBuyCommand::Start {
            group,
            product,
            price,
            target,
            slots,
            ends_in,
        } => {
            let req = proto::StartGroupBuy {
                group_id: group,
                product_id: product,
                price_minor: price,
                target,
                slots,
                starts_at_ms: 0,
                deadline_ms: server_time_in(client, ends_in).await?,
            };
            println!("{}", client.start_group_buy(req).await?.seq);
        }
        GroupBuyCommand::Join { group, id } => {
            println!("{}", result_name(&client.join_group_buy(group, id).await?));
        }
        GroupBuyCommand::Leave { group, id } => {
            println!("{}", result_name(&client.leave_group_buy(group, id).await?));
        }
        GroupBuyCommand::Cancel { group, id } => {
            let a = client.end_commerce(group, id).await?;
            print_object(&a, false);
        }
        GroupBuyCommand::Show { group, id, json } => {
            print_object(&client.commerce_object(group, id).await?, json);
        }
    }
    Ok(())
}

async fn coupon(client: &Client, command: CouponCommand) -> Result<(), ClientError> {
    match command {
        CouponCommand::Issue {
            group,
            title,
            amount,
            min_spend,
            currency,
            quantity,
            per_buyer,
            expires_in,
        } => {
            let req = proto::IssueCoupon {
                group_id: group,
                title,
                amount_minor: amount,
                min_spend_minor: min_spend,
                currency,
                quantity,
                per_buyer_limit: per_buyer,
                expires_at_ms: server_time_in(client, expires_in).await?,
            };
            println!("{}", client.issue_coupon(req).await?.seq);
        }
        CouponCommand::Claim { group, id } => {
            println!("{}", result_name(&client.claim_coupon(group, id).await?));
        }
        CouponCommand::Show { group, id, json } => {
            print_object(&client.commerce_object(group, id).await?, json);
        }
    }
    Ok(())
}

async fn poll(client: &Client, command: PollCommand) -> Result<(), ClientError> {
    match command {
        PollCommand::Open {
            group,
            question,
            options,
            ends_in,
            r#final,
        } => {
            let req = proto::OpenPoll {
                group_id: group,
                question,
                options,
                deadline_ms: server_time_in(client, ends_in).await?,
                votes_final: r#final,
            };
            println!("{}", client.open_poll(req).await?.seq);
        }
        PollCommand::Vote { group, id, option } => {
            println!("{}", result_name(&client.vote(group, id, option).await?));
        }
        PollCommand::Show { group, id, json } => {
            print_object(&client.commerce_object(group, id).await?, json);
        }
        PollCommand::Close { group, id } => {
            print_object(&client.end_commerce(group, id).await?, false);
        }
    }
    Ok(())
}

/// Prints a commerce object: one JSON object, or a line for people.
fn print_object(a: &proto::CommerceAnswer, json: bool) {
    use proto::commerce_answer::Object;
    let v = match &a.object {
        Some(Object::GroupBuy(g)) => json!({
            "group_buy_id": g.group_buy_id,
            "state": g.state().as_str_name().trim_start_matches("GROUP_BUY_STATE_").to_ascii_lowercase(),
            "closed": g.closed,
            "joined": g.joined,
            "target": g.target,
            "slots": g.slots,
            "price_minor": g.price_minor,
            "deadline_ms": g.deadline_ms,
            "server_time_ms": a.server_time_ms,
            "joined_by_you": a.joined_by_you,
        }),
        Some(Object::Coupon(c)) => json!({
            "coupon_id": c.coupon_id,
            "title": c.title,
            "claimed": c.claimed,
            "quantity": c.quantity,
            "expires_at_ms": c.expires_at_ms,
            "server_time_ms": a.server_time_ms,
            "claimed_by_you": a.claimed_by_you,
        }),
        Some(Object::Poll(p)) => json!({
            "poll_id": p.poll_id,
            "question": p.question,
            "options": p.options.iter().map(|o| json!({"text": o.text, "votes": o.votes})).collect::<Vec<_>>(),
            "closed": p.closed,
            "voters": p.voters,
            "deadline_ms": p.deadline_ms,
            "server_time_ms": a.server_time_ms,
            "your_vote": a.your_vote,
        }),
        Some(Object::Product(p)) => json!({"product_id": p.product_id, "version": p.version}),
        None => json!({}),
    };
    if json {
        println!("{v}");
        return;
    }
    match v.as_object() {
        Some(fields) => {
            let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{}", line.join(" "));
        }
        None => println!("{v}"),
    }
}

/// Sends once, reconnecting and resending with the same client message id
/// after connection failures (with a growing pause), so a flaky network
/// never posts the message twice.
/// Where and as whom to connect.
struct Server<'a> {
    url: &'a str,
    token: &'a str,
    options: ClientOptions,
}

async fn send_with_retries(
    server: &Server<'_>,
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
            let client =
                Client::connect_with(server.url, server.token, server.options.clone()).await?;
            client
                .send_with_id(group, text, reply_to, client_msg_id)
                .await
        }
        .await;
        match tried {
            Err(e) if e.is_connection_error() && attempt < retries => {
                attempt += 1;
                eprintln!("qun-cli: {e}; retrying ({attempt}/{retries}) with the same message id");
                // A full server's Retry-After is longer than the backoff.
                tokio::time::sleep(e.retry_after().map_or(pause, |wait| wait.max(pause))).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

fn print_board(board: &proto::FaqBoard, json_out: bool) {
    let pins: Vec<serde_json::Value> = board
        .pins
        .iter()
        .map(|p| match p.target {
            Some(proto::pin::Target::FaqId(id)) => json!({"faq_id": id}),
            Some(proto::pin::Target::MessageSeq(seq)) => json!({"message_seq": seq}),
            None => json!({}),
        })
        .collect();
    if json_out {
        let entries: Vec<serde_json::Value> = board
            .entries
            .iter()
            .map(|e| {
                json!({"faq_id": e.faq_id, "question": e.question, "answer": e.answer,
                       "question_seq": e.question_seq, "answer_seq": e.answer_seq})
            })
            .collect();
        println!(
            "{}",
            json!({"group": board.group_id, "entries": entries, "pins": pins})
        );
        return;
    }
    for e in &board.entries {
        println!("FAQ {}: Q: {} / A: {}", e.faq_id, e.question, e.answer);
    }
    for p in &pins {
        println!("pinned {p}");
    }
}

fn kind_name(kind: i32) -> &'static str {
    match proto::MessageKind::try_from(kind) {
        Ok(proto::MessageKind::Text) => "text",
        Ok(proto::MessageKind::Commerce) => "commerce",
        Ok(proto::MessageKind::Hidden) => "hidden",
        Ok(proto::MessageKind::Recall) => "recall",
        Ok(proto::MessageKind::Board) => "board",
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
    if let Some(q) = &m.quote {
        v["quote"] = json!({
            "seq": q.seq,
            "sender": q.sender_id,
            "sender_name": q.sender_name,
            "text": q.text,
            "recalled": q.recalled,
        });
    }
    if m.recalled {
        v["recalled"] = json!(true);
    }
    if m.recalls != 0 {
        v["recalls"] = json!(m.recalls);
    }
    v.to_string()
}

fn human(m: &proto::ChatMessage) -> String {
    if m.kind == proto::MessageKind::Hidden as i32 {
        return format!("#{} (a promotion not shown to you)", m.seq);
    }
    if m.kind == proto::MessageKind::Recall as i32 {
        return format!("#{} {} recalled #{}", m.seq, m.sender_name, m.recalls);
    }
    if m.recalled {
        return format!("#{} {} ({}): (recalled)", m.seq, m.sender_name, m.sender_id);
    }
    let quote = m
        .quote
        .as_ref()
        .map(|q| match q.recalled {
            true => format!(" [re #{} {}: (recalled)]", q.seq, q.sender_name),
            false => format!(" [re #{} {}: {}]", q.seq, q.sender_name, q.text),
        })
        .unwrap_or_default();
    format!(
        "#{} {} ({}){}: {}",
        m.seq, m.sender_name, m.sender_id, quote, m.text
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn at_takes_utc_and_offsets() {
        let utc = super::parse_at("2026-12-07T01:00:00Z").unwrap();
        assert_eq!(utc, 1_796_605_200_000);
        assert_eq!(super::parse_at("2026-12-07T09:00:00+08:00").unwrap(), utc);
        assert_eq!(super::parse_at("2026-12-06T20:00:00-05:00").unwrap(), utc);
        assert!(super::parse_at("next monday").is_err());
    }

    #[test]
    fn a_reply_to_a_recalled_message_says_so_instead_of_the_quote() {
        let quote = |recalled: bool| super::proto::Quote {
            seq: 3,
            sender_name: "Ann".into(),
            text: if recalled {
                String::new()
            } else {
                "S or M?".into()
            },
            recalled,
            ..Default::default()
        };
        let reply = |recalled| super::proto::ChatMessage {
            seq: 4,
            sender_name: "Bo".into(),
            sender_id: "bo".into(),
            kind: super::proto::MessageKind::Text as i32,
            text: "M".into(),
            reply_to: 3,
            quote: Some(quote(recalled)),
            ..Default::default()
        };
        assert_eq!(
            super::human(&reply(false)),
            "#4 Bo (bo) [re #3 Ann: S or M?]: M"
        );
        assert_eq!(
            super::human(&reply(true)),
            "#4 Bo (bo) [re #3 Ann: (recalled)]: M"
        );
        let json: serde_json::Value = serde_json::from_str(&super::as_json(&reply(true))).unwrap();
        assert_eq!(json["reply_to"], 3);
        assert_eq!(json["quote"]["seq"], 3);
        assert_eq!(json["quote"]["recalled"], true);
        assert_eq!(json["quote"]["text"], "");
        let json: serde_json::Value = serde_json::from_str(&super::as_json(&reply(false))).unwrap();
        assert_eq!(json["quote"]["text"], "S or M?");
        assert_eq!(json["quote"]["recalled"], false);
    }
}
