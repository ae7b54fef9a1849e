//! Exclusive customer service (专属客服): one-to-one sessions between a
//! buyer of the shop's required tier and the shop's agents.
//!
//! A **session is a group** of its own — the buyer, and the agents who
//! handled it — so its messages, gap-free sequence, storage, resume,
//! idempotent sends, read marks and unread counts are the groups' own, and
//! the only people who can read it are its buyer and the shop's staff (a
//! session group admits no other buyer). One buyer has one session per
//! shop: it closes after inactivity and the buyer's next message opens it
//! again, in the same conversation.
//!
//! **Routing.** A buyer opening a session reaches their assigned agent if
//! that agent is online (presence ONLINE, connected, under their cap);
//! otherwise the least-loaded available agent of the shop, and the
//! assigned agent is told. When every agent is at their cap the session
//! waits in the shop's queue, first come first served, and the buyer is
//! told their position as it moves.
//!
//! **Proactive contact.** The buyer's assigned agent may open a session
//! (new arrivals, back in stock). Each opening takes one unit of the shop's
//! proactive quota, which follows the same buyer feedback as group reach
//! ([`crate::reach`]): blocks and reports narrow it, replies and purchases
//! widen it, and below [`PROACTIVE_MIN_SCORE`] the shop loses proactive
//! contact until its score recovers. A buyer can block proactive contact
//! from a shop.
//!
//! Per shop, every change happens under one async lock: customer service
//! moves at human speed, and one order of events per shop keeps routing
//! and the queue simple to reason about.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use dashmap::DashMap;
use qun_proto::v1::{self, CsState, Presence, server_frame::Body};
use qun_storage::WriteOp;
use qun_storage::records::{CsBuyerRecord, CsShopRecord, GroupRecord, MemberRecord};
use tokio::sync::Mutex;

use qun_storage::StoreExt as _;

use crate::groups::durable;
use crate::permissions::{Operation, require};
use crate::reach::{DAY_MS, Signal, utc_day};
use crate::segments::{Tier, tier};
use crate::{ChatError, Groups, Identity, Role};

/// Open sessions per agent, unless the shop sets its own.
pub const DEFAULT_AGENT_CAP: u32 = 5;
/// A session with no message for this long closes, unless the shop says.
pub const DEFAULT_IDLE_CLOSE_MS: u64 = 30 * 60 * 1000;
/// Proactive openings per day at a neutral score, unless the shop says.
pub const DEFAULT_PROACTIVE_BASE: u32 = 10;
/// Below this score a shop cannot open sessions proactively.
pub const PROACTIVE_MIN_SCORE: f64 = -0.3;
/// The shop's groups listed in an agent's context, at most.
const CONTEXT_GROUPS: usize = 20;
/// The buyer's groups looked at for them, at most (a buyer may be in
/// thousands of groups of many shops).
const CONTEXT_READS: usize = 200;
/// Longest transfer note, in characters.
const MAX_NOTE: usize = 500;

/// One shop's customer service in memory.
#[derive(Debug)]
struct CsShop {
    config: CsShopRecord,
    /// Agents who set a presence since the server started.
    agents: HashMap<String, AgentLive>,
    /// Buyers' records read so far.
    buyers: HashMap<String, CsBuyerRecord>,
    /// Buyers waiting, first served first.
    queue: VecDeque<String>,
}

#[derive(Debug, Clone)]
struct AgentLive {
    name: String,
    role: Role,
    presence: Presence,
}

/// Every shop's customer service that has been used since start-up.
#[derive(Debug, Default)]
pub(crate) struct CsShops {
    shops: DashMap<String, Arc<Mutex<CsShop>>>,
    /// When [`Groups::cs_tick`] last swept (it looks at every buyer read
    /// back, so at most once a second).
    swept_at_ms: std::sync::atomic::AtomicU64,
}

/// Least time between two sweeps for idle sessions.
const SWEEP_EVERY_MS: u64 = 1_000;

fn state_of(r: &CsBuyerRecord) -> CsState {
    i32::try_from(r.state)
        .ok()
        .and_then(|s| CsState::try_from(s).ok())
        .unwrap_or(CsState::Closed)
}

fn set_state(r: &mut CsBuyerRecord, s: CsState) {
    r.state = s as u32;
}

fn tier_rank(t: Tier) -> u8 {
    match t {
        Tier::New => 0,
        Tier::Regular => 1,
        Tier::Vip => 2,
    }
}

fn parse_tier(name: &str) -> Option<Tier> {
    match name {
        "new" => Some(Tier::New),
        "regular" => Some(Tier::Regular),
        "vip" => Some(Tier::Vip),
        _ => None,
    }
}

/// A shop's settings as a shop that set nothing has them.
fn default_config(shop_id: &str) -> CsShopRecord {
    CsShopRecord {
        shop_id: shop_id.to_string(),
        required_tier: "vip".into(),
        agent_cap: DEFAULT_AGENT_CAP,
        idle_close_ms: DEFAULT_IDLE_CLOSE_MS,
        proactive_base: DEFAULT_PROACTIVE_BASE,
        proactive_day: 0,
        proactive_used: 0,
    }
}

fn staff_shop(who: &Identity) -> Result<&str, ChatError> {
    who.shop_id()
        .filter(|_| who.role().is_staff())
        .ok_or(ChatError::ForbiddenRole {
            role: who.role().as_str(),
            action: "serve a shop's customers",
        })
}

/// A buyer id as identities take it.
fn check_buyer_id(buyer: &str) -> Result<(), ChatError> {
    Identity::new(buyer, "buyer", Role::Buyer, None)
        .map(drop)
        .map_err(|e| invalid(format!("buyer id: {e}")))
}

fn invalid(m: impl Into<String>) -> ChatError {
    ChatError::InvalidArgument(m.into())
}

impl CsShop {
    /// Open sessions `agent` handles.
    fn load(&self, agent: &str) -> u32 {
        self.buyers
            .values()
            .filter(|r| state_of(r) == CsState::Open && r.agent_id == agent)
            .count() as u32
    }

    fn position(&self, buyer: &str) -> u32 {
        self.queue
            .iter()
            .position(|b| b == buyer)
            .map_or(0, |i| i as u32 + 1)
    }

    /// The session on the wire (without context).
    fn wire(&self, r: &CsBuyerRecord) -> v1::CsSession {
        let state = state_of(r);
        v1::CsSession {
            session_id: r.session_id,
            shop_id: r.shop_id.clone(),
            buyer_id: r.buyer_id.clone(),
            state: state as i32,
            agent_id: if state == CsState::Open {
                r.agent_id.clone()
            } else {
                String::new()
            },
            assigned_agent: r.assigned_agent.clone(),
            queue_position: self.position(&r.buyer_id),
            proactive: r.proactive,
            context: None,
        }
    }
}

/// What a change must tell whom, once the shop's lock is released.
#[derive(Default)]
struct Notices {
    /// `(user, session)`: pushes, with context for staff.
    pushes: Vec<(String, v1::CsSession, Option<String>)>,
    /// `(session_id, agent, name)` to make members of the session.
    admit: Vec<(u64, String, String, Role)>,
}

impl Groups {
    fn cs(&self) -> &CsShops {
        &self.inner().cs
    }

    /// The shop's customer service, loaded once.
    async fn cs_shop(&self, shop_id: &str) -> Result<Arc<Mutex<CsShop>>, ChatError> {
        if let Some(s) = self.cs().shops.get(shop_id) {
            return Ok(s.clone());
        }
        let config = self
            .inner()
            .store
            .load_cs_shop(shop_id)
            .await?
            .unwrap_or_else(|| default_config(shop_id));
        self.ensure_feedback(shop_id).await?;
        Ok(self
            .cs()
            .shops
            .entry(shop_id.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(CsShop {
                    config,
                    agents: HashMap::new(),
                    buyers: HashMap::new(),
                    queue: VecDeque::new(),
                }))
            })
            .clone())
    }

    /// The buyer's record in `shop`, read once.
    async fn cs_buyer<'a>(
        &self,
        shop: &'a mut CsShop,
        buyer: &str,
    ) -> Result<&'a mut CsBuyerRecord, ChatError> {
        if !shop.buyers.contains_key(buyer) {
            let r = self
                .inner()
                .store
                .load_cs_buyer(&shop.config.shop_id, buyer)
                .await?
                .unwrap_or_else(|| CsBuyerRecord {
                    shop_id: shop.config.shop_id.clone(),
                    buyer_id: buyer.to_string(),
                    state: CsState::Closed as u32,
                    ..Default::default()
                });
            shop.buyers.insert(buyer.to_string(), r);
        }
        Ok(shop
            .buyers
            .get_mut(buyer)
            .expect("inserted just above when missing"))
    }

    /// Whether `agent` takes a new session now.
    fn available(&self, shop: &CsShop, agent: &str) -> bool {
        shop.agents
            .get(agent)
            .is_some_and(|a| a.presence == Presence::Online)
            && self.inner().devices.count(agent) > 0
            && shop.load(agent) < shop.config.agent_cap
    }

    /// The agent for a new session: the assigned one if available, else
    /// the least loaded available one (ties: by id, for a stable order).
    fn pick_agent(&self, shop: &CsShop, assigned: &str) -> Option<String> {
        if !assigned.is_empty() && self.available(shop, assigned) {
            return Some(assigned.to_string());
        }
        shop.agents
            .keys()
            .filter(|a| self.available(shop, a))
            .min_by_key(|a| (shop.load(a), (*a).clone()))
            .cloned()
    }

    /// Writes a buyer's record (and the shop's, when given) and waits.
    async fn cs_write(
        &self,
        buyer: &CsBuyerRecord,
        shop: Option<&CsShopRecord>,
        mut extra: Vec<WriteOp>,
    ) -> Result<(), ChatError> {
        extra.push(WriteOp::PutCsBuyer(buyer.clone()));
        if let Some(s) = shop {
            extra.push(WriteOp::PutCsShop(s.clone()));
        }
        Ok(self.inner().store.write(extra).await?)
    }

    /// The buyer's session group, created with the record that names it
    /// the first time.
    async fn ensure_session(
        &self,
        rec: &mut CsBuyerRecord,
        buyer_name: &str,
        now_ms: u64,
    ) -> Result<Vec<WriteOp>, ChatError> {
        if rec.session_id != 0 {
            return Ok(Vec::new());
        }
        let group_id = self.next_group_id();
        let record = GroupRecord {
            group_id,
            shop_id: rec.shop_id.clone(),
            name: "Customer service".into(),
            max_members: 100,
            created_at_ms: now_ms,
            created_by: rec.buyer_id.clone(),
            cs_buyer: rec.buyer_id.clone(),
            ..Default::default()
        };
        let member = MemberRecord {
            group_id,
            user_id: rec.buyer_id.clone(),
            display_name: buyer_name.to_string(),
            role: Role::Buyer.to_u32(),
            joined_at_ms: now_ms,
        };
        rec.session_id = group_id;
        self.install_group(record.clone(), vec![member.clone()], now_ms);
        Ok(vec![WriteOp::PutGroup(record), WriteOp::PutMember(member)])
    }

    /// Assigns `rec` to `agent` (open) and notes who to tell.
    fn assign(
        &self,
        shop: &CsShop,
        rec: &mut CsBuyerRecord,
        agent: &str,
        now_ms: u64,
        notices: &mut Notices,
    ) {
        set_state(rec, CsState::Open);
        rec.agent_id = agent.to_string();
        rec.last_activity_ms = now_ms;
        let live = shop.agents.get(agent).cloned();
        let (name, role) = live.map_or((agent.to_string(), Role::Agent), |a| (a.name, a.role));
        notices
            .admit
            .push((rec.session_id, agent.to_string(), name, role));
        let mut session = shop.wire(rec);
        session.state = CsState::Open as i32;
        session.agent_id = agent.to_string();
        notices
            .pushes
            .push((agent.to_string(), session.clone(), Some(String::new())));
        if !rec.assigned_agent.is_empty() && rec.assigned_agent != agent {
            // The buyer's own agent is told who took it.
            notices.pushes.push((
                rec.assigned_agent.clone(),
                session.clone(),
                Some(String::new()),
            ));
        }
    }

    /// Routes a buyer's (re)opening: to their assigned agent or the least
    /// loaded available one, else to the back of the queue.
    fn route(&self, s: &mut CsShop, rec: &mut CsBuyerRecord, now_ms: u64, notices: &mut Notices) {
        rec.proactive = false;
        match self.pick_agent(s, &rec.assigned_agent) {
            Some(agent) => self.assign(s, rec, &agent, now_ms, notices),
            None => {
                set_state(rec, CsState::Queued);
                rec.agent_id.clear();
                rec.last_activity_ms = now_ms;
                s.queue.push_back(rec.buyer_id.clone());
            }
        }
    }

    /// Serves the queue while agents are free; tells those still waiting
    /// where they stand.
    async fn drain_queue(
        &self,
        shop: &mut CsShop,
        now_ms: u64,
        notices: &mut Notices,
    ) -> Result<(), ChatError> {
        let mut moved = false;
        while let Some(buyer) = shop.queue.front().cloned() {
            let assigned = shop
                .buyers
                .get(&buyer)
                .map(|r| r.assigned_agent.clone())
                .unwrap_or_default();
            let Some(agent) = self.pick_agent(shop, &assigned) else {
                break;
            };
            shop.queue.pop_front();
            moved = true;
            let Some(mut rec) = shop.buyers.get(&buyer).cloned() else {
                continue;
            };
            self.assign(shop, &mut rec, &agent, now_ms, notices);
            self.cs_write(&rec, None, Vec::new()).await?;
            notices.pushes.push((buyer.clone(), shop.wire(&rec), None));
            shop.buyers.insert(buyer, rec);
        }
        if moved {
            for b in &shop.queue {
                if let Some(r) = shop.buyers.get(b) {
                    notices.pushes.push((b.clone(), shop.wire(r), None));
                }
            }
        }
        Ok(())
    }

    /// Closes sessions idle past the shop's limit (the check is also made
    /// whenever a session is touched, so a restart loses nothing).
    async fn close_idle(
        &self,
        shop: &mut CsShop,
        now_ms: u64,
        notices: &mut Notices,
    ) -> Result<(), ChatError> {
        let idle = shop.config.idle_close_ms;
        let stale: Vec<String> = shop
            .buyers
            .values()
            .filter(|r| {
                state_of(r) == CsState::Open && r.last_activity_ms.saturating_add(idle) <= now_ms
            })
            .map(|r| r.buyer_id.clone())
            .collect();
        for buyer in stale {
            let Some(mut rec) = shop.buyers.get(&buyer).cloned() else {
                continue;
            };
            let agent = std::mem::take(&mut rec.agent_id);
            set_state(&mut rec, CsState::Closed);
            self.cs_write(&rec, None, Vec::new()).await?;
            notices.pushes.push((buyer.clone(), shop.wire(&rec), None));
            notices
                .pushes
                .push((agent, shop.wire(&rec), Some(String::new())));
            shop.buyers.insert(buyer, rec);
        }
        Ok(())
    }

    /// Tells everyone concerned, with context for staff, and makes the
    /// agents members of their sessions.
    async fn cs_deliver(&self, notices: Notices, now_ms: u64) {
        for (session_id, agent, name, role) in notices.admit {
            if let Err(e) = self
                .admit_staff(session_id, &agent, &name, role, now_ms)
                .await
            {
                tracing::warn!(session_id, agent, error = %e, "agent not admitted to session");
            }
        }
        // One read of a buyer's context per delivery, whoever is told.
        let mut contexts: HashMap<(String, String), Option<v1::CsContext>> = HashMap::new();
        for (user, mut session, note) in notices.pushes {
            if user.is_empty() {
                continue;
            }
            if let Some(note) = note {
                let key = (session.shop_id.clone(), session.buyer_id.clone());
                if !contexts.contains_key(&key) {
                    let c = self.cs_context(&key.0, &key.1).await.ok();
                    contexts.insert(key.clone(), c);
                }
                session.context = contexts[&key].clone().map(|c| v1::CsContext { note, ..c });
            }
            let frame = qun_proto::encode_server_frame(&v1::ServerFrame {
                request_id: 0,
                body: Some(Body::CsSession(session)),
            });
            self.inner().devices.push_to_all(&user, &frame);
        }
    }

    /// Makes a staff member a member of a session group (once).
    async fn admit_staff(
        &self,
        session_id: u64,
        user: &str,
        name: &str,
        role: Role,
        now_ms: u64,
    ) -> Result<(), ChatError> {
        let cell = self.cell(session_id).await?;
        let shop = cell.lock().record.shop_id.clone();
        let who = Identity::new(user, name, role, Some(shop))
            .map_err(|e| ChatError::InvalidArgument(e.to_string()))?;
        if let Some(rx) = self.admit_member(&cell, &who, now_ms)? {
            durable(rx).await?;
        }
        Ok(())
    }

    /// What the agent sees of the buyer: tags, tier, the shop's groups.
    async fn cs_context(&self, shop_id: &str, buyer: &str) -> Result<v1::CsContext, ChatError> {
        let tags: BTreeSet<String> = self.tags_of(shop_id, buyer).await?;
        let mut groups = Vec::new();
        let ids = self.inner().store.groups_of_user(buyer).await?;
        for id in ids.into_iter().take(CONTEXT_READS) {
            if groups.len() >= CONTEXT_GROUPS {
                break;
            }
            // Only this shop's groups are loaded into memory: another
            // shop's are told apart by their record.
            let ours = match self.loaded_cell(id) {
                Some(cell) => Some(cell),
                None => match self.inner().store.load_group(id).await? {
                    Some(r) if r.shop_id == shop_id && r.cs_buyer.is_empty() => {
                        self.cell(id).await.ok()
                    }
                    _ => None,
                },
            };
            if let Some(cell) = ours {
                let g = cell.lock();
                if g.record.shop_id == shop_id && g.record.cs_buyer.is_empty() {
                    groups.push(g.info());
                }
            }
        }
        Ok(v1::CsContext {
            tier: tier(&tags).as_str().to_string(),
            tags: tags.into_iter().collect(),
            groups,
            note: String::new(),
        })
    }

    /// Opens (or reopens) a session. A buyer gives `shop_id`: they reach
    /// their assigned agent, another available agent, or the queue. The
    /// buyer's assigned agent gives `buyer_id`: proactive contact, which
    /// takes one unit of the shop's proactive quota. Answered with the
    /// session; the agents concerned and the buyer are pushed it too.
    ///
    /// # Errors
    /// `ForbiddenRole`; `InvalidArgument` (no shop or buyer, or an agent
    /// who is not the buyer's assigned one); `NotEligible` (the buyer's
    /// tier is below the shop's); for proactive contact `ContactBlocked`,
    /// `ProactiveOff`, `QuotaExhausted`; `Storage`.
    pub async fn cs_open(
        &self,
        who: &Identity,
        req: v1::CsOpen,
        now_ms: u64,
    ) -> Result<v1::CsSession, ChatError> {
        require(who, Operation::CsSession)?;
        if who.role() == Role::Buyer {
            self.cs_open_as_buyer(who, &req.shop_id, now_ms).await
        } else {
            self.cs_open_proactive(who, &req.buyer_id, now_ms).await
        }
    }

    async fn cs_open_as_buyer(
        &self,
        who: &Identity,
        shop_id: &str,
        now_ms: u64,
    ) -> Result<v1::CsSession, ChatError> {
        crate::commerce::check_id("shop_id", shop_id, 64)?;
        let shop = self.cs_shop(shop_id).await?;
        let mut s = shop.lock().await;
        let required = parse_tier(&s.config.required_tier).unwrap_or(Tier::Vip);
        let tags = self.tags_of(shop_id, who.user_id()).await?;
        if tier_rank(tier(&tags)) < tier_rank(required) {
            return Err(ChatError::NotEligible);
        }
        let mut notices = Notices::default();
        self.close_idle(&mut s, now_ms, &mut notices).await?;
        let mut rec = self.cs_buyer(&mut s, who.user_id()).await?.clone();
        let extra = self
            .ensure_session(&mut rec, who.display_name(), now_ms)
            .await?;
        // An open session idle past the limit counts as closed (the tick
        // may not have seen it: a restart, a buyer not yet read back).
        let idle = rec.last_activity_ms.saturating_add(s.config.idle_close_ms) <= now_ms;
        match state_of(&rec) {
            CsState::Open if !idle => rec.last_activity_ms = now_ms,
            CsState::Queued if s.position(who.user_id()) > 0 => {}
            _ => self.route(&mut s, &mut rec, now_ms, &mut notices),
        }
        self.cs_write(&rec, None, extra).await?;
        let answer = s.wire(&rec);
        s.buyers.insert(who.user_id().to_string(), rec);
        drop(s);
        self.cs_deliver(notices, now_ms).await;
        Ok(answer)
    }

    async fn cs_open_proactive(
        &self,
        who: &Identity,
        buyer: &str,
        now_ms: u64,
    ) -> Result<v1::CsSession, ChatError> {
        let shop_id = staff_shop(who)?.to_string();
        check_buyer_id(buyer)?;
        let shop = self.cs_shop(&shop_id).await?;
        let mut s = shop.lock().await;
        let mut rec = self.cs_buyer(&mut s, buyer).await?.clone();
        if rec.assigned_agent != who.user_id() && who.role() != Role::Owner {
            return Err(invalid(format!(
                "only {buyer}'s assigned agent (or the owner) may contact them first"
            )));
        }
        if rec.blocked {
            return Err(ChatError::ContactBlocked);
        }
        let idle = rec.last_activity_ms.saturating_add(s.config.idle_close_ms) <= now_ms;
        if state_of(&rec) == CsState::Open && !idle {
            return Err(invalid(format!(
                "{buyer} already has an open session, with {}",
                rec.agent_id
            )));
        }
        // The quota: the shop's score as for group reach, its own base.
        let (_, _, score, _) = self.standing(&shop_id, now_ms);
        if score < PROACTIVE_MIN_SCORE || s.config.proactive_base == 0 {
            return Err(ChatError::ProactiveOff);
        }
        let day = utc_day(now_ms);
        let mut config = s.config.clone();
        if config.proactive_day != day {
            config.proactive_day = day;
            config.proactive_used = 0;
        }
        let policy = crate::reach::ReachPolicy {
            base_per_day: config.proactive_base,
            ..self.inner().config.reach
        };
        if let Some(limit) = policy.daily_limit(score)
            && config.proactive_used >= limit
        {
            return Err(ChatError::QuotaExhausted {
                limit,
                retry_after_ms: (day + 1) * DAY_MS - now_ms,
            });
        }
        config.proactive_used += 1;
        let extra = self.ensure_session(&mut rec, buyer, now_ms).await?;
        s.queue.retain(|b| b != buyer);
        let mut notices = Notices::default();
        rec.proactive = true;
        self.assign(&s, &mut rec, who.user_id(), now_ms, &mut notices);
        self.cs_write(&rec, Some(&config), extra).await?;
        s.config = config;
        let answer = s.wire(&rec);
        notices
            .pushes
            .push((buyer.to_string(), answer.clone(), None));
        s.buyers.insert(buyer.to_string(), rec);
        drop(s);
        // The agent who opened it is answered, not pushed.
        notices.pushes.retain(|(u, _, _)| u != who.user_id());
        notices.admit.retain(|(_, u, _, _)| u != who.user_id());
        self.admit_staff(
            answer.session_id,
            who.user_id(),
            who.display_name(),
            who.role(),
            now_ms,
        )
        .await?;
        self.cs_deliver(notices, now_ms).await;
        let mut answer = answer;
        answer.context = Some(self.cs_context(&shop_id, buyer).await?);
        Ok(answer)
    }

    /// The shop and buyer of a session group, checking the caller may act
    /// on it: its buyer, or staff of its shop.
    async fn session_of(
        &self,
        who: &Identity,
        session_id: u64,
    ) -> Result<(String, String), ChatError> {
        let cell = self.cell(session_id).await?;
        let g = cell.lock();
        if g.record.cs_buyer.is_empty() {
            return Err(invalid(format!("group {session_id} is not a session")));
        }
        if who.role().is_staff() {
            g.check_shop(who)?;
        } else if who.user_id() != g.record.cs_buyer {
            return Err(ChatError::NotMember(session_id));
        }
        Ok((g.record.shop_id.clone(), g.record.cs_buyer.clone()))
    }

    /// Hands an open session to another agent of the shop, who is online
    /// and under their cap, with a note only staff see. The conversation
    /// goes on in the same session: the buyer sees one sequence, with a
    /// line saying who took over.
    ///
    /// # Errors
    /// `ForbiddenRole` (buyers), `WrongShop`, `UnknownGroup`,
    /// `InvalidArgument` (not a session, not open, the agent not available,
    /// a note over 500 characters), `Storage`.
    pub async fn cs_transfer(
        &self,
        who: &Identity,
        req: v1::CsTransfer,
        now_ms: u64,
    ) -> Result<v1::CsSession, ChatError> {
        require(who, Operation::CsTransfer)?;
        if req.note.chars().count() > MAX_NOTE {
            return Err(invalid(format!("a note is at most {MAX_NOTE} characters")));
        }
        let (shop_id, buyer) = self.session_of(who, req.session_id).await?;
        let shop = self.cs_shop(&shop_id).await?;
        let mut s = shop.lock().await;
        let mut rec = self.cs_buyer(&mut s, &buyer).await?.clone();
        if state_of(&rec) != CsState::Open {
            return Err(invalid("only an open session can be transferred"));
        }
        if req.to_agent == rec.agent_id || !self.available(&s, &req.to_agent) {
            return Err(invalid(format!(
                "{} is not available: online, connected and under their cap",
                req.to_agent
            )));
        }
        let from = std::mem::take(&mut rec.agent_id);
        let mut notices = Notices::default();
        self.assign(&s, &mut rec, &req.to_agent, now_ms, &mut notices);
        self.cs_write(&rec, None, Vec::new()).await?;
        for push in &mut notices.pushes {
            if push.0 == req.to_agent {
                push.2 = Some(req.note.clone());
            }
        }
        let answer = s.wire(&rec);
        notices.pushes.push((buyer.clone(), answer.clone(), None));
        notices
            .pushes
            .push((from, answer.clone(), Some(String::new())));
        let name = s
            .agents
            .get(&req.to_agent)
            .map_or(req.to_agent.clone(), |a| a.name.clone());
        s.buyers.insert(buyer, rec);
        // The agent handing over may have room for the queue now.
        self.drain_queue(&mut s, now_ms, &mut notices).await?;
        drop(s);
        self.cs_deliver(notices, now_ms).await;
        self.post_system_text(
            req.session_id,
            &format!("{name} is here to help you now."),
            now_ms,
        )
        .await?;
        Ok(answer)
    }

    /// Closes a session (its buyer, or staff of the shop). The buyer's next
    /// message or CsOpen opens it again.
    ///
    /// # Errors
    /// `UnknownGroup`, `NotMember`, `WrongShop`, `InvalidArgument` (not a
    /// session), `Storage`.
    pub async fn cs_close(
        &self,
        who: &Identity,
        session_id: u64,
        now_ms: u64,
    ) -> Result<v1::CsSession, ChatError> {
        require(who, Operation::CsSession)?;
        let (shop_id, buyer) = self.session_of(who, session_id).await?;
        let shop = self.cs_shop(&shop_id).await?;
        let mut s = shop.lock().await;
        let mut rec = self.cs_buyer(&mut s, &buyer).await?.clone();
        let agent = std::mem::take(&mut rec.agent_id);
        set_state(&mut rec, CsState::Closed);
        s.queue.retain(|b| b != &buyer);
        self.cs_write(&rec, None, Vec::new()).await?;
        let answer = s.wire(&rec);
        s.buyers.insert(buyer.clone(), rec);
        let mut notices = Notices::default();
        notices.pushes.push((buyer, answer.clone(), None));
        notices
            .pushes
            .push((agent, answer.clone(), Some(String::new())));
        notices.pushes.retain(|(u, _, _)| u != who.user_id());
        self.drain_queue(&mut s, now_ms, &mut notices).await?;
        drop(s);
        self.cs_deliver(notices, now_ms).await;
        Ok(answer)
    }

    /// Posts a line from the platform in a session (who took it over).
    async fn post_system_text(
        &self,
        session_id: u64,
        text: &str,
        now_ms: u64,
    ) -> Result<(), ChatError> {
        let system = Identity::new("qun", "Qun", Role::System, None)
            .map_err(|e| ChatError::InvalidArgument(e.to_string()))?;
        let cell = self.cell(session_id).await?;
        let rx = {
            let mut g = cell.lock();
            g.refuse_if_failed()?;
            let record = g.next_message(&system, text.to_string(), 0, None, String::new(), now_ms);
            self.submit_sequenced(&cell, &mut g, record, Vec::new())?
        };
        durable(rx).await
    }

    /// The queue: staff of the shop get every waiting session and every
    /// agent's presence and load; a buyer gets their own place.
    ///
    /// # Errors
    /// `WrongShop` (staff of another shop), `InvalidArgument`, `Storage`.
    pub async fn cs_queue(
        &self,
        who: &Identity,
        shop_id: &str,
        now_ms: u64,
    ) -> Result<v1::CsQueueState, ChatError> {
        require(who, Operation::CsSession)?;
        let shop_id = if who.role().is_staff() {
            let own = staff_shop(who)?;
            if !shop_id.is_empty() && shop_id != own {
                return Err(ChatError::WrongShop);
            }
            own.to_string()
        } else {
            crate::commerce::check_id("shop_id", shop_id, 64)?;
            shop_id.to_string()
        };
        let shop = self.cs_shop(&shop_id).await?;
        let mut s = shop.lock().await;
        let mut notices = Notices::default();
        self.close_idle(&mut s, now_ms, &mut notices).await?;
        let answer = self.queue_state(&s, who);
        drop(s);
        self.cs_deliver(notices, now_ms).await;
        Ok(answer)
    }

    fn queue_state(&self, s: &CsShop, who: &Identity) -> v1::CsQueueState {
        let staff = who.role().is_staff();
        let waiting = s
            .queue
            .iter()
            .filter(|b| staff || *b == who.user_id())
            .filter_map(|b| s.buyers.get(b))
            .map(|r| s.wire(r))
            .collect();
        let mut agents: Vec<v1::CsAgent> = if staff {
            s.agents
                .iter()
                .map(|(id, a)| v1::CsAgent {
                    agent_id: id.clone(),
                    presence: if self.inner().devices.count(id) > 0 {
                        a.presence as i32
                    } else {
                        Presence::Offline as i32
                    },
                    sessions: s.load(id),
                    cap: s.config.agent_cap,
                })
                .collect()
        } else {
            Vec::new()
        };
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        v1::CsQueueState {
            shop_id: s.config.shop_id.clone(),
            waiting,
            agents,
        }
    }

    /// Sets an agent's presence in their shop. Going online serves the
    /// queue at once. An agent with no open connection is offline whatever
    /// they set.
    ///
    /// # Errors
    /// `ForbiddenRole` (buyers), `Storage`.
    pub async fn set_presence(
        &self,
        who: &Identity,
        presence: Presence,
        now_ms: u64,
    ) -> Result<v1::CsQueueState, ChatError> {
        require(who, Operation::SetPresence)?;
        let shop_id = staff_shop(who)?.to_string();
        let shop = self.cs_shop(&shop_id).await?;
        let mut s = shop.lock().await;
        s.agents.insert(
            who.user_id().to_string(),
            AgentLive {
                name: who.display_name().to_string(),
                role: who.role(),
                presence,
            },
        );
        let mut notices = Notices::default();
        self.close_idle(&mut s, now_ms, &mut notices).await?;
        self.drain_queue(&mut s, now_ms, &mut notices).await?;
        let answer = self.queue_state(&s, who);
        drop(s);
        self.cs_deliver(notices, now_ms).await;
        Ok(answer)
    }

    /// A buyer blocks (or unblocks) proactive contact from a shop.
    /// Blocking tells the shop's feedback (a negative signal, once per
    /// change to blocked).
    ///
    /// # Errors
    /// `ForbiddenRole` (staff), `InvalidArgument`, `Storage`.
    pub async fn cs_block(
        &self,
        who: &Identity,
        shop_id: &str,
        blocked: bool,
        now_ms: u64,
    ) -> Result<v1::CsBlocked, ChatError> {
        require(who, Operation::CsBlock)?;
        crate::commerce::check_id("shop_id", shop_id, 64)?;
        let shop = self.cs_shop(shop_id).await?;
        let mut s = shop.lock().await;
        let mut rec = self.cs_buyer(&mut s, who.user_id()).await?.clone();
        if rec.blocked != blocked {
            rec.blocked = blocked;
            self.cs_write(&rec, None, Vec::new()).await?;
            s.buyers.insert(who.user_id().to_string(), rec);
            if blocked {
                self.record_signal(shop_id, Signal::ContactBlocked, now_ms);
            }
        }
        Ok(v1::CsBlocked {
            shop_id: shop_id.to_string(),
            blocked,
        })
    }

    /// Called after a message is posted in a session group: keeps it
    /// open, reopens it for a buyer's message, and counts a buyer's reply
    /// to proactive contact as positive feedback (once per opening).
    pub(crate) async fn cs_on_message(
        &self,
        shop_id: &str,
        buyer: &str,
        sender: &Identity,
        now_ms: u64,
    ) -> Result<(), ChatError> {
        let shop = self.cs_shop(shop_id).await?;
        let mut s = shop.lock().await;
        let mut rec = self.cs_buyer(&mut s, buyer).await?.clone();
        let mut notices = Notices::default();
        let from_buyer = sender.user_id() == buyer;
        let idle = rec.last_activity_ms.saturating_add(s.config.idle_close_ms) <= now_ms;
        match state_of(&rec) {
            CsState::Open if !idle => {
                rec.last_activity_ms = now_ms;
                if from_buyer && rec.proactive {
                    rec.proactive = false;
                    self.record_signal(shop_id, Signal::Replied, now_ms);
                }
            }
            CsState::Queued => rec.last_activity_ms = now_ms,
            _ if from_buyer => {
                self.route(&mut s, &mut rec, now_ms, &mut notices);
                notices.pushes.push((buyer.to_string(), s.wire(&rec), None));
            }
            _ => rec.last_activity_ms = now_ms,
        }
        self.cs_write(&rec, None, Vec::new()).await?;
        s.buyers.insert(buyer.to_string(), rec);
        drop(s);
        self.cs_deliver(notices, now_ms).await;
        Ok(())
    }

    /// Closes idle sessions and serves queues, in every shop in use.
    /// Called by [`Groups::tick`].
    pub(crate) async fn cs_tick(&self, now_ms: u64) {
        use std::sync::atomic::Ordering;
        let last = self.cs().swept_at_ms.load(Ordering::Relaxed);
        if now_ms < last.saturating_add(SWEEP_EVERY_MS)
            || self
                .cs()
                .swept_at_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let shops: Vec<Arc<Mutex<CsShop>>> =
            self.cs().shops.iter().map(|e| e.value().clone()).collect();
        for shop in shops {
            // A shop busy with a request is visited on a later tick.
            let Ok(mut s) = shop.try_lock() else {
                continue;
            };
            let mut notices = Notices::default();
            let r = async {
                self.close_idle(&mut s, now_ms, &mut notices).await?;
                self.drain_queue(&mut s, now_ms, &mut notices).await
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(shop = %s.config.shop_id, error = %e, "customer-service tick");
            }
            drop(s);
            self.cs_deliver(notices, now_ms).await;
        }
    }

    /// The shop's customer-service settings (staff).
    ///
    /// # Errors
    /// `ForbiddenRole`, `Storage`.
    pub async fn cs_config(&self, who: &Identity) -> Result<CsShopRecord, ChatError> {
        require(who, Operation::ManageCs)?;
        let shop = self.cs_shop(staff_shop(who)?).await?;
        Ok(shop.lock().await.config.clone())
    }

    /// Sets the shop's required tier (`new`, `regular`, `vip`), per-agent
    /// cap (1 to 100), idle close (1 minute to 7 days) and proactive base
    /// (0 to 1,000 a day). Staff of the shop.
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument` naming the setting, `Storage`.
    pub async fn set_cs_config(
        &self,
        who: &Identity,
        required_tier: &str,
        agent_cap: u32,
        idle_close_ms: u64,
        proactive_base: u32,
        now_ms: u64,
    ) -> Result<CsShopRecord, ChatError> {
        require(who, Operation::ManageCs)?;
        if parse_tier(required_tier).is_none() {
            return Err(invalid("required_tier is new, regular or vip"));
        }
        if !(1..=100).contains(&agent_cap) {
            return Err(invalid("agent_cap is 1 to 100"));
        }
        if !(60_000..=7 * DAY_MS).contains(&idle_close_ms) {
            return Err(invalid("idle_close_ms is one minute to seven days"));
        }
        if proactive_base > 1_000 {
            return Err(invalid("proactive_base is at most 1000 a day"));
        }
        let shop = self.cs_shop(staff_shop(who)?).await?;
        let mut s = shop.lock().await;
        let config = CsShopRecord {
            required_tier: required_tier.to_string(),
            agent_cap,
            idle_close_ms,
            proactive_base,
            ..s.config.clone()
        };
        self.inner()
            .store
            .write(vec![WriteOp::PutCsShop(config.clone())])
            .await?;
        s.config = config.clone();
        let mut notices = Notices::default();
        self.drain_queue(&mut s, now_ms, &mut notices).await?;
        drop(s);
        self.cs_deliver(notices, now_ms).await;
        Ok(config)
    }

    /// A buyer's record with the caller's shop (staff).
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument`, `Storage`.
    pub async fn cs_buyer_record(
        &self,
        who: &Identity,
        buyer: &str,
    ) -> Result<CsBuyerRecord, ChatError> {
        require(who, Operation::ManageCs)?;
        check_buyer_id(buyer)?;
        let shop = self.cs_shop(staff_shop(who)?).await?;
        let mut s = shop.lock().await;
        Ok(self.cs_buyer(&mut s, buyer).await?.clone())
    }

    /// Assigns a buyer's exclusive agent ("" removes it). Staff.
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument` (a malformed id), `Storage`.
    pub async fn assign_cs_agent(
        &self,
        who: &Identity,
        buyer: &str,
        agent: &str,
    ) -> Result<CsBuyerRecord, ChatError> {
        require(who, Operation::ManageCs)?;
        check_buyer_id(buyer)?;
        if !agent.is_empty() {
            crate::commerce::check_id("agent_id", agent, 64)?;
        }
        let shop = self.cs_shop(staff_shop(who)?).await?;
        let mut s = shop.lock().await;
        let mut rec = self.cs_buyer(&mut s, buyer).await?.clone();
        rec.assigned_agent = agent.to_string();
        self.cs_write(&rec, None, Vec::new()).await?;
        s.buyers.insert(buyer.to_string(), rec.clone());
        Ok(rec)
    }

    /// The shop's systems report that a buyer bought something: positive
    /// feedback for the shop (it widens proactive contact and reach).
    ///
    /// # Errors
    /// `ForbiddenRole`, `InvalidArgument`, `Storage`.
    pub async fn record_purchase(
        &self,
        who: &Identity,
        buyer: &str,
        now_ms: u64,
    ) -> Result<(), ChatError> {
        require(who, Operation::ManageCs)?;
        check_buyer_id(buyer)?;
        let shop_id = staff_shop(who)?;
        self.ensure_feedback(shop_id).await?;
        self.record_signal(shop_id, Signal::Purchased, now_ms);
        Ok(())
    }
}
