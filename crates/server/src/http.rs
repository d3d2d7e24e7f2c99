//! The HTTP endpoints (README "Observability"): `/healthz`, `/readyz`, `/status`, `/metrics`.

use std::sync::Arc;

use actix_web::{HttpResponse, Responder, get, web};
use eps_actors::StatusBoard;
use eps_cluster::NodeStatus;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::monitor::Health;

pub struct AppState {
    pub node_id: String,
    pub cluster: String,
    pub health: Arc<Health>,
    pub node: Arc<NodeStatus>,
    pub board: Arc<StatusBoard>,
    pub prometheus: PrometheusHandle,
}

#[get("/healthz")]
async fn healthz() -> impl Responder {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

#[get("/readyz")]
async fn readyz(state: web::Data<AppState>) -> impl Responder {
    if state.health.ready() {
        HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("not connected to both stores\n")
    }
}

#[get("/status")]
async fn status(state: web::Data<AppState>) -> impl Responder {
    let document = state
        .health
        .document(&state.node_id, &state.cluster, &state.node, &state.board);
    HttpResponse::Ok().json(document)
}

#[get("/metrics")]
async fn metrics_endpoint(state: web::Data<AppState>) -> impl Responder {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.prometheus.render())
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(healthz)
        .service(readyz)
        .service(status)
        .service(metrics_endpoint);
}
