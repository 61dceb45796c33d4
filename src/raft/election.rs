//! Election assist: starts an election early when a vote exchange shows this node should lead.
//!
//! openraft 0.9 elects in one round only if the first node to time out has the longest log and
//! nobody else campaigns at the same term. Under a stream of writes the followers' logs often
//! differ by an entry when the leader dies, and every node draws its election timeout once per
//! process, so two followers collide again and again. Measured on three nodes in network
//! namespaces with 200–300 ms timeouts: a median of 1.2 s from SIGKILL of the leader to a new one,
//! when one round takes 0.55 s. The refused candidate with the shorter log backs off
//! (openraft's `smaller_log_timeout`), but the node with the longer log only campaigns when its
//! own timer fires, and may then meet the other at the same term.
//!
//! Three rules. Two are decided by [`should_campaign`] from what one vote exchange showed:
//! - **longer log**: a voter that refused a candidate because the candidate's log is shorter, and
//!   has heard from no leader for a lease, campaigns at once: someone timed out, and this node's
//!   log is more complete than theirs.
//! - **collision**: a candidate refused by a peer that campaigns at the same term (a vote for
//!   another node, not yet committed) and whose log is shorter campaigns again at once, at the
//!   next term: that peer will grant it.
//!
//! The third, **leader silent** ([`silence_calls_for_election`]), stands in for openraft's
//! election timer when that is held back by a stale delay (see [`run`]).
//!
//! Starting an election is always safe in Raft (votes and logs decide who wins); these rules only
//! change when one starts, never who may win. Each is counted in
//! `bayard_election_assists_total{reason}`. [`paced`] keeps them at openraft's own pace: no
//! election starts within the shortest election timeout of another (this node's, openraft's or
//! a peer's), except the one immediate retry of a collision; and only a voter's vote request
//! counts as a hint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::raft::{VoteRequest, VoteResponse};
use openraft::ServerState;
use tokio::sync::mpsc;

use super::types::{NodeId, Raft};

/// What one vote exchange showed, before it is checked against this node's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// This node answered a vote request (`request`) with `response`.
    Answered { request: VoteRequest<NodeId>, response: VoteResponse<NodeId> },
    /// This node asked for a vote with `request` and a peer answered `response`.
    Asked { request: VoteRequest<NodeId>, response: VoteResponse<NodeId> },
}

/// Which rule fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    LongerLog,
    Collision,
    LeaderSilent,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::LongerLog => "longer_log",
            Rule::Collision => "collision",
            Rule::LeaderSilent => "leader_silent",
        }
    }
}

/// This node as the decision needs it, read when the hint is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub node_id: NodeId,
    pub state: ServerState,
    pub is_voter: bool,
    pub current_term: u64,
    /// Whether openraft names a leader (an elected one: a candidacy is not a leader).
    pub leader_known: bool,
    /// Time since this node last accepted entries or a heartbeat from a leader.
    pub leader_silence: Duration,
    /// openraft's leader lease: a voter refuses every candidate for this long after hearing
    /// from its leader (openraft sets it to the longest election timeout).
    pub lease: Duration,
}

/// Whether this node should start an election now, and by which rule.
pub fn should_campaign(hint: &Hint, observed: &Observed) -> Option<Rule> {
    if !observed.is_voter || observed.state == ServerState::Leader || observed.state == ServerState::Learner {
        return None;
    }
    match hint {
        Hint::Answered { request, response } => {
            let refused_for_its_log = !response.vote_granted && response.last_log_id > request.last_log_id;
            // A live leader keeps this node's lease fresh: then the candidate is a node that
            // was cut off, and this node must not disturb the cluster on its account.
            let leaderless = observed.leader_silence >= observed.lease;
            let newer_term = request.vote.leader_id().term >= observed.current_term;
            (refused_for_its_log && leaderless && newer_term && request.vote.leader_id().node_id != observed.node_id)
                .then_some(Rule::LongerLog)
        }
        Hint::Asked { request, response } => {
            let term = request.vote.leader_id().term;
            let same_term_other_candidate = response.vote.leader_id().term == term
                && !response.vote.is_committed()
                && response.vote.leader_id().node_id != observed.node_id;
            let peer_log_shorter = response.last_log_id < request.last_log_id;
            // Leader ids order by (term, node id): when the peer's id is higher, openraft takes
            // its vote and this node becomes a follower of that candidacy, at the same term.
            let still_campaigning = observed.current_term == term && !observed.leader_known;
            (!response.vote_granted && same_term_other_candidate && peer_log_shorter && still_campaigning)
                .then_some(Rule::Collision)
        }
    }
}

/// Whether a voter that has heard from no leader for a while should campaign now: silent for
/// `wait` (the lease plus a random election timeout, drawn again for each silence), and no
/// election of its own started in the last `retry` (one election timeout), so that failed ones
/// are retried at openraft's pace, not faster.
pub fn silence_calls_for_election(
    observed: &Observed,
    wait: Duration,
    retry: Duration,
    since_last_election: Option<Duration>,
) -> bool {
    let campaigning_state = matches!(observed.state, ServerState::Follower | ServerState::Candidate);
    observed.is_voter
        && campaigning_state
        && observed.leader_silence >= wait
        && since_last_election.is_none_or(|elapsed| elapsed >= retry)
}

/// Whether an election `rule` calls for may start now. `since_last_assist` and `last_rule`
/// describe the last election the assist started, `since_term_change` the last change of term
/// this node saw (its own elections, openraft's, a vote granted), `min_gap` the shortest
/// election timeout.
///
/// A collision is the second step of an election this node has just started, so it may follow
/// any other rule at once, but not another collision within `min_gap` (a voter answering every
/// vote with a same-term collision cannot make this node campaign faster than its timer would).
/// The other rules wait until no election has started for `min_gap`: they must not cut short
/// an election under way, this node's or another's.
pub fn paced(
    rule: Rule,
    since_last_assist: Option<Duration>,
    last_rule: Option<Rule>,
    since_term_change: Duration,
    min_gap: Duration,
) -> bool {
    let gap_since_last = since_last_assist.is_none_or(|elapsed| elapsed >= min_gap);
    match rule {
        Rule::Collision => last_rule != Some(Rule::Collision) || gap_since_last,
        Rule::LongerLog | Rule::LeaderSilent => gap_since_last && since_term_change >= min_gap,
    }
}

/// The handle the network (asked) and the Raft handler (answered) report vote exchanges to;
/// cheap to clone.
#[derive(Clone)]
pub struct ElectionAssist {
    hints: mpsc::Sender<Hint>,
    started: Instant,
    /// Milliseconds after `started` when a leader was last heard from.
    leader_heard_at: Arc<AtomicU64>,
}

/// Hints waiting for the assist task; more are dropped (the rules are an optimization).
const HINT_QUEUE: usize = 64;

impl ElectionAssist {
    /// The handle and the receiving end that [`run`] takes.
    pub fn new() -> (ElectionAssist, mpsc::Receiver<Hint>) {
        let (hints, receiver) = mpsc::channel(HINT_QUEUE);
        let assist = ElectionAssist { hints, started: Instant::now(), leader_heard_at: Arc::new(AtomicU64::new(0)) };
        (assist, receiver)
    }

    pub fn report(&self, hint: Hint) {
        // A full queue means elections are already being assisted; dropping a hint only leaves
        // openraft's own timer in charge.
        let _ = self.hints.try_send(hint);
    }

    /// A leader's entries or heartbeat were accepted.
    pub fn heard_from_leader(&self) {
        self.leader_heard_at.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn leader_silence(&self) -> Duration {
        let heard_at = Duration::from_millis(self.leader_heard_at.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(heard_at)
    }
}

/// The timings the assist works with, the node's Raft timings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
}

impl Timing {
    /// openraft's leader lease: the longest election timeout.
    fn lease(&self) -> Duration {
        self.election_timeout_max
    }

    fn random_timeout(&self) -> Duration {
        let (min, max) = (self.election_timeout_min.as_millis() as u64, self.election_timeout_max.as_millis() as u64);
        Duration::from_millis(if max > min { rand::random_range(min..max) } else { min })
    }
}

/// How often the leader's silence is checked.
const SILENCE_CHECK: Duration = Duration::from_millis(20);

/// Handles hints, and watches the leader's silence, until the node shuts down.
///
/// The silence rule stands in for openraft's own election timer, which can be held back long
/// after the reason is gone: a node whose candidacy was refused for its shorter log waits an
/// extra twice the longest election timeout before its next timer-driven election, and openraft
/// clears that only when such an election starts — so a node that lost one election by its log
/// carried the delay into the next leader failure (measured: elections of 1.1–1.3 s instead of
/// 0.55 s, in a run of leader cuts). Here a voter silent for the lease plus a random election
/// timeout campaigns, which is what openraft's timer does without the stale delay; the shorter
/// log loses anyway (votes decide), and the longer one then campaigns by the first rule.
pub async fn run(
    raft: Raft,
    assist: ElectionAssist,
    mut hints: mpsc::Receiver<Hint>,
    timing: Timing,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // At most one hinted election per term this node observed, and all of them paced by
    // `paced`: neither peers' hints nor the silence make elections faster than openraft's own
    // timer would, except the one immediate retry of a collision.
    let mut last_assisted_term: Option<u64> = None;
    let mut last_election: Option<(Instant, Rule)> = None;
    // Silence counts from the start of this task, as openraft's timer counts from its start.
    assist.heard_from_leader();
    let mut last_term = raft.metrics().borrow().current_term;
    let mut term_changed_at = Instant::now();
    let mut silence_wait = timing.lease() + timing.random_timeout();
    let mut ticker = tokio::time::interval(SILENCE_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease = timing.lease();
    loop {
        let hint = tokio::select! {
            hint = hints.recv() => match hint {
                Some(hint) => Some(hint),
                None => return,
            },
            _ = ticker.tick() => None,
            _ = shutdown.changed() => return,
        };
        if matches!(hint, Some(Hint::Asked { .. })) {
            // The response is handed to openraft after the network reports it: let openraft take
            // it first, so that the state read below includes it.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let observed = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            Observed {
                node_id: metrics.id,
                state: metrics.state,
                is_voter: metrics.membership_config.membership().voter_ids().any(|id| id == metrics.id),
                current_term: metrics.current_term,
                leader_known: metrics.current_leader.is_some(),
                leader_silence: assist.leader_silence(),
                lease,
            }
        };
        if observed.state == ServerState::Leader {
            // A leader hears from itself: when it steps down, its silence counts from then, as
            // openraft's timer does (the vote changes then).
            assist.heard_from_leader();
        }
        if observed.current_term != last_term {
            // A new term: a vote was granted or changed, an election started or ended. openraft
            // counts its own timer from there; so does the silence.
            last_term = observed.current_term;
            term_changed_at = Instant::now();
            assist.heard_from_leader();
        }
        if let Some(Hint::Answered { request, .. }) = &hint {
            // Only a voter's candidacy says anything about this cluster's election.
            let candidate = request.vote.leader_id().node_id;
            let candidate_votes =
                raft.metrics().borrow().membership_config.membership().voter_ids().any(|id| id == candidate);
            if !candidate_votes {
                continue;
            }
        }
        let rule = match &hint {
            None => {
                if observed.leader_silence < lease {
                    // A leader is heard from: the next silence gets a new random wait.
                    silence_wait = lease + timing.random_timeout();
                    continue;
                }
                let since_last_election = last_election.map(|(at, _)| at.elapsed());
                if !silence_calls_for_election(
                    &observed,
                    silence_wait,
                    timing.election_timeout_max,
                    since_last_election,
                ) {
                    continue;
                }
                Rule::LeaderSilent
            }
            Some(hint) => {
                if last_assisted_term.is_some_and(|term| observed.current_term <= term) {
                    continue;
                }
                let Some(rule) = should_campaign(hint, &observed) else {
                    continue;
                };
                last_assisted_term = Some(observed.current_term);
                rule
            }
        };
        let since_last_election = last_election.map(|(at, _)| at.elapsed());
        let last_rule = last_election.map(|(_, rule)| rule);
        if !paced(rule, since_last_election, last_rule, term_changed_at.elapsed(), timing.election_timeout_min) {
            continue;
        }
        last_election = Some((Instant::now(), rule));
        crate::telemetry::metrics::record_election_assist(rule.name());
        tracing::info!(rule = rule.name(), term = observed.current_term, "starting an election before the timer");
        if let Err(error) = raft.trigger().elect().await {
            tracing::debug!(%error, "raft stopped; no election");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 0), index))
    }

    fn vote(term: u64, node_id: NodeId, committed: bool) -> Vote<NodeId> {
        if committed {
            Vote::new_committed(term, node_id)
        } else {
            Vote::new(term, node_id)
        }
    }

    fn request(term: u64, candidate: NodeId, last_log: Option<LogId<NodeId>>) -> VoteRequest<NodeId> {
        VoteRequest::new(vote(term, candidate, false), last_log)
    }

    fn response(vote: Vote<NodeId>, granted: bool, last_log: Option<LogId<NodeId>>) -> VoteResponse<NodeId> {
        VoteResponse::new(vote, last_log, granted)
    }

    /// Node 2, a follower of a leader silent for 400 ms, lease 300 ms, term 3.
    fn follower() -> Observed {
        Observed {
            node_id: 2,
            state: ServerState::Follower,
            is_voter: true,
            current_term: 3,
            leader_known: true,
            leader_silence: Duration::from_millis(400),
            lease: Duration::from_millis(300),
        }
    }

    fn candidate(term: u64) -> Observed {
        Observed { state: ServerState::Candidate, current_term: term, leader_known: false, ..follower() }
    }

    #[test]
    fn answered_vote_requests() {
        let shorter = request(4, 1, log(3, 10));
        let refused_longer = response(vote(3, 1, true), false, log(3, 12));
        let cases: Vec<(&str, Hint, Observed, Option<Rule>)> = vec![
            (
                "refused a shorter candidate, leader silent past the lease: campaign",
                Hint::Answered { request: shorter.clone(), response: refused_longer.clone() },
                follower(),
                Some(Rule::LongerLog),
            ),
            (
                "the leader was heard within the lease: a cut-off node's request, stay",
                Hint::Answered { request: shorter.clone(), response: refused_longer.clone() },
                Observed { leader_silence: Duration::from_millis(100), ..follower() },
                None,
            ),
            (
                "granted: the candidate's log is as good",
                Hint::Answered {
                    request: request(4, 1, log(3, 12)),
                    response: response(vote(4, 1, false), true, log(3, 12)),
                },
                follower(),
                None,
            ),
            (
                "refused by vote, logs equal: not this rule",
                Hint::Answered {
                    request: request(4, 1, log(3, 12)),
                    response: response(vote(4, 2, false), false, log(3, 12)),
                },
                candidate(4),
                None,
            ),
            (
                "a stale request from an older term",
                Hint::Answered {
                    request: request(2, 1, log(2, 5)),
                    response: response(vote(3, 3, true), false, log(3, 12)),
                },
                follower(),
                None,
            ),
            (
                "a learner never campaigns",
                Hint::Answered { request: shorter.clone(), response: refused_longer.clone() },
                Observed { state: ServerState::Learner, is_voter: false, ..follower() },
                None,
            ),
            (
                "not a voter of the membership",
                Hint::Answered { request: shorter.clone(), response: refused_longer.clone() },
                Observed { is_voter: false, ..follower() },
                None,
            ),
            (
                "the leader itself",
                Hint::Answered { request: shorter.clone(), response: refused_longer.clone() },
                Observed { state: ServerState::Leader, ..follower() },
                None,
            ),
            (
                "no log at all against one entry: campaign",
                Hint::Answered { request: request(4, 1, None), response: response(vote(3, 1, true), false, log(1, 1)) },
                follower(),
                Some(Rule::LongerLog),
            ),
        ];
        for (name, hint, observed, expected) in cases {
            assert_eq!(should_campaign(&hint, &observed), expected, "{name}");
        }
    }

    #[test]
    fn pacing() {
        let gap = Duration::from_millis(200);
        let ms = Duration::from_millis;
        /// Name, rule, since the last assisted election and its rule, since the last term
        /// change, expected.
        type Case = (&'static str, Rule, Option<Duration>, Option<Rule>, Duration, bool);
        let cases: Vec<Case> = vec![
            ("first election, quiet terms", Rule::LongerLog, None, None, ms(5000), true),
            (
                "the collision right after this node's longer-log election",
                Rule::Collision,
                Some(ms(3)),
                Some(Rule::LongerLog),
                ms(3),
                true,
            ),
            ("a second collision at once: no", Rule::Collision, Some(ms(3)), Some(Rule::Collision), ms(3), false),
            (
                "a collision an election timeout later",
                Rule::Collision,
                Some(ms(250)),
                Some(Rule::Collision),
                ms(5),
                true,
            ),
            ("longer log while an election just started", Rule::LongerLog, None, None, ms(50), false),
            (
                "longer log soon after this node's last election",
                Rule::LongerLog,
                Some(ms(100)),
                Some(Rule::LeaderSilent),
                ms(5000),
                false,
            ),
            ("silence soon after openraft's own election", Rule::LeaderSilent, None, None, ms(10), false),
            ("silence, nothing for a while", Rule::LeaderSilent, Some(ms(900)), Some(Rule::Collision), ms(900), true),
        ];
        for (name, rule, since_last, last_rule, since_term_change, expected) in cases {
            assert_eq!(paced(rule, since_last, last_rule, since_term_change, gap), expected, "{name}");
        }
    }

    #[test]
    fn leader_silence() {
        let wait = Duration::from_millis(550);
        let retry = Duration::from_millis(250);
        let silent = |millis| Observed { leader_silence: Duration::from_millis(millis), ..follower() };
        let cases: Vec<(&str, Observed, Option<Duration>, bool)> = vec![
            ("silent past the wait, no election yet: campaign", silent(560), None, true),
            ("not yet silent long enough", silent(540), None, false),
            ("own election a moment ago: let it run", silent(900), Some(Duration::from_millis(100)), false),
            ("own election failed an election timeout ago: again", silent(900), Some(Duration::from_millis(260)), true),
            ("a candidate, silent: campaign", Observed { state: ServerState::Candidate, ..silent(600) }, None, true),
            ("a learner never", Observed { state: ServerState::Learner, is_voter: false, ..silent(5000) }, None, false),
            ("not a voter", Observed { is_voter: false, ..silent(5000) }, None, false),
            ("the leader never", Observed { state: ServerState::Leader, ..silent(5000) }, None, false),
        ];
        for (name, observed, since_last_election, expected) in cases {
            assert_eq!(silence_calls_for_election(&observed, wait, retry, since_last_election), expected, "{name}");
        }
    }

    #[test]
    fn asked_for_votes() {
        let mine = request(4, 2, log(3, 12));
        let cases: Vec<(&str, Hint, Observed, Option<Rule>)> = vec![
            (
                "the peer campaigns at my term with a shorter log: go again",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 1, false), false, log(3, 10)) },
                candidate(4),
                Some(Rule::Collision),
            ),
            (
                "the peer's log is as long: it may win, leave it to the timers",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 1, false), false, log(3, 12)) },
                candidate(4),
                None,
            ),
            (
                "the peer follows a live leader (committed vote): no",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 1, true), false, log(3, 10)) },
                candidate(4),
                None,
            ),
            (
                "the peer is at a newer term: openraft takes its term, not this rule",
                Hint::Asked { request: mine.clone(), response: response(vote(5, 1, false), false, log(3, 10)) },
                candidate(4),
                None,
            ),
            (
                "granted",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 2, false), true, log(3, 10)) },
                candidate(4),
                None,
            ),
            (
                "already moved on to another term",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 1, false), false, log(3, 10)) },
                candidate(5),
                None,
            ),
            (
                "lost the tie to the peer's higher id and follows its candidacy: go again",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 3, false), false, log(3, 10)) },
                Observed { current_term: 4, leader_known: false, ..follower() },
                Some(Rule::Collision),
            ),
            (
                "no longer campaigning: a leader was elected meanwhile",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 1, false), false, log(3, 10)) },
                Observed { current_term: 4, leader_known: true, ..follower() },
                None,
            ),
            (
                "became the leader meanwhile",
                Hint::Asked { request: mine.clone(), response: response(vote(4, 1, false), false, log(3, 10)) },
                Observed { state: ServerState::Leader, current_term: 4, ..follower() },
                None,
            ),
        ];
        for (name, hint, observed, expected) in cases {
            assert_eq!(should_campaign(&hint, &observed), expected, "{name}");
        }
    }
}
