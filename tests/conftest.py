import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def gaussian_eps_model(schedule, mu: float, s: float):
    """The exact optimal eps-prediction for data x0 ~ N(mu, s^2 I): eps_hat = E[eps | x_t]."""

    def model(x_t, t):
        ab = schedule.alpha_bar_at(t).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        a, b2 = ab.sqrt(), 1 - ab
        x0_hat = mu + a * s**2 / (a**2 * s**2 + b2) * (x_t - a * mu)
        return (x_t - a * x0_hat) / b2.sqrt()

    return model


def one_line_exit_2(main, argv, capsys, match: str) -> None:
    """The CLI's contract for bad input: exit status 2 and one line on stderr naming the problem."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets gain nothing from intra-op threads, and on a busy machine OpenMP's barriers cost
    seconds per forward: a module marked ``pytest.mark.usefixtures("one_thread")`` runs on one
    thread, and the setting is restored for the other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
